"""Anytime-valid change detection for rates: a CUSUM e-detector over Bernoulli likelihood ratios.

A *rate test* watches a 0/1 statistic ``X`` of live traffic (e.g. "stage 0's score is at least
0.83" among the requests that reach stage 0) whose mean the calibration measured as ``m`` on
``n`` images. Its null hypothesis allows the live mean anywhere in ``[m - tol, m + tol]`` (the
tolerance absorbs the calibration's own sampling error, see :func:`tolerance`); a change is a
mean outside it.

Each detector ``d`` bets on one alternative ``p1`` beyond one edge ``b`` of that band, with the
Bernoulli likelihood ratio ``L = (p1/b)^X ((1-p1)/(1-b))^(1-X)``. For every live mean on the
null side of ``b``, ``E[L | past] <= 1`` (``E[L]`` is linear in the mean and equals 1 at ``b``), so
``L`` is an e-value; a request that does not observe the statistic contributes ``L = 1``.
The CUSUM e-detector (Shin, Ramdas & Rinaldo, *E-detectors: a nonparametric framework for
sequential change detection*, 2024) is ``M_n = max(M_{n-1}, 1) * L_n``: the largest e-process
started at any past request. It is dominated by the Shiryaev-Roberts e-detector, for which
``M_n - n`` is a supermartingale under the null, so for every stopping time ``E[M_tau] <= E[tau]``;
an average of such detectors (fixed weights) keeps that property. Raising the alarm when the
weighted average reaches ``c`` therefore has an average run length to a false alarm of at least
``c`` requests, however often it is checked: ``c = 10,000`` means at most one false alarm per
10,000 in-distribution requests on average (after an alarm the detector restarts from scratch).

The update is vectorised over a block of requests: with ``W`` the log of ``max(M, 1)`` and ``l``
the log ratios, ``W_n = max(W_{n-1} + l_n, 0)`` is a reflected random walk, so with
``C = W_0 + cumsum(l)``, ``W_n = C_n - min(0, min_{j<=n} C_j)`` and ``log M_n = C_n - min(0,
min_{j<n} C_j)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Alternatives each rate test bets on: the live mean this far beyond the null band (absolute).
SHIFTS = (0.05, 0.12, 0.3)
#: Tolerance of a rate test: this many standard errors of the calibration estimate ...
TOLERANCE_Z = 3.0
#: ... plus this much, for what differs between calibration and a fresh sample of the same images.
TOLERANCE_FLOOR = 0.005
_EDGE = 1e-3  # alternatives stay this far inside (0, 1)


def tolerance(mean: float, n: int, z: float = TOLERANCE_Z, floor: float = TOLERANCE_FLOOR) -> float:
    """Half-width of the null band of a rate measured as ``mean`` on ``n`` calibration images."""
    var = max(mean * (1.0 - mean), 1.0 / max(n, 1))
    return z * math.sqrt(var / max(n, 1)) + floor


def bets(mean: float, tol: float, shifts: tuple[float, ...] = SHIFTS) -> list[tuple[float, float, str]]:
    """``(log L at X=0, log L at X=1, direction)`` of each detector of one rate test (both sides of the band)."""
    out = []
    for direction, b in (("up", mean + tol), ("down", mean - tol)):
        if not 0.0 < b < 1.0:
            continue  # the band reaches 0 or 1: the live mean cannot leave it on this side
        for shift in shifts:
            p1 = min(b + shift, 1.0 - _EDGE) if direction == "up" else max(b - shift, _EDGE)
            if (p1 - b) * (1 if direction == "up" else -1) <= 0:
                continue
            out.append((math.log((1.0 - p1) / (1.0 - b)), math.log(p1 / b), direction))
    return out


@dataclass(frozen=True)
class Crossing:
    """An alarm: at ``index`` (0-based, counted over every request the detector saw) the evidence reached the
    threshold; ``detector`` is the one that weighed most then."""

    index: int
    log_evidence: float
    detector: int


def bernoulli_ratios(block: np.ndarray, stat: np.ndarray, log_l0: np.ndarray, log_l1: np.ndarray) -> np.ndarray:
    """Log likelihood ratios (N x D) of detectors watching columns ``stat`` of an ``N x S`` int8 block of 0/1
    statistics (-1 where a request did not observe the statistic: ratio 1)."""
    x = block[:, stat]
    return np.where(x < 0, 0.0, np.where(x > 0, log_l1, log_l0))


class EDetector:
    """The weighted average of ``D`` CUSUM e-detectors; alarm when it reaches ``threshold``.

    :meth:`update` takes the detectors' log e-values of a block of requests (``N x D``, 0 where a
    request says nothing to a detector) and returns the alarms in it. ``threshold`` is ``c``: the
    average run length to a false alarm is at least ``c`` requests. ``weight`` sums to 1.
    """

    def __init__(self, weight: np.ndarray, threshold: float):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.log_weight = np.log(self.weight)
        self.log_threshold = math.log(threshold)
        self.threshold = float(threshold)
        self.state = np.zeros(len(self.log_weight))  # W = log max(M, 1) of each detector
        self.seen = 0
        self.log_evidence = 0.0

    def reset(self) -> None:
        """Start afresh (after an alarm): every detector at ``M = 1``."""
        self.state[:] = 0.0
        self.log_evidence = 0.0

    def update(self, ratios: np.ndarray) -> list[Crossing]:
        """Feed ``ratios`` (N x D log e-values, in request order); the alarms raised (the detector restarts after each)."""
        alarms: list[Crossing] = []
        if not len(self.log_weight):
            self.seen += len(ratios)
            return alarms
        start = 0
        while start < len(ratios):
            part = ratios[start:]
            c = self.state + np.cumsum(part, axis=0)
            low = np.minimum(np.minimum.accumulate(c, axis=0), 0.0)
            before = np.vstack([np.zeros((1, c.shape[1])), low[:-1]])
            log_m = c - before
            peak = log_m.max(axis=0)  # no row's average can exceed the average of the detectors' peaks
            top = peak.max()
            if top + math.log(np.exp(peak - top) @ self.weight) < self.log_threshold:
                last = log_m[-1]
                self.state = c[-1] - low[-1]
                self.log_evidence = float(last.max() + math.log(np.exp(last - last.max()) @ self.weight))
                break
            top = log_m.max(axis=1)
            evidence = top + np.log(np.exp(log_m - top[:, None]) @ self.weight)
            hits = np.flatnonzero(evidence >= self.log_threshold)
            if not len(hits):
                self.state = c[-1] - low[-1]
                self.log_evidence = float(evidence[-1])
                break
            i = int(hits[0])
            alarms.append(Crossing(self.seen + start + i, float(evidence[i]), int(np.argmax(log_m[i] + self.log_weight))))
            self.reset()
            start += i + 1
        self.seen += len(ratios)
        return alarms


#: Chance that the calibration's class shares lie outside the null set of a :class:`MultinomialBet` ...
NULL_LEVEL = 1e-3
#: ... plus this much chi-square distance, for what differs between calibration and a fresh sample.
CHI2_FLOOR = 5e-4
#: Live observations the plug-in alternative remembers (exponential forgetting) ...
WINDOW = 200
#: ... and the weight, in observations, of the calibration distribution it starts from.
PRIOR = 20.0


def chi2_quantile(dof: int, level: float) -> float:
    """The upper ``level`` quantile of a chi-square distribution (Wilson-Hilferty; within 1 % for dof >= 3)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1.0 - level)
    h = 2.0 / (9.0 * dof)
    return dof * max(1.0 - h + z * math.sqrt(h), 0.0) ** 3


class MultinomialBet:
    """An adaptive e-value for "the live distribution over ``K`` cells is still the calibration's".

    The calibration counted ``counts`` (``n`` in all; ``p`` is their share, with half a count added to
    each cell). The null set allows every live distribution ``P`` with chi-square distance
    ``sum_x (P(x) - p(x))^2 / p(x) <= rho``, ``rho = chi2_{K-1}(1 - NULL_LEVEL) / n + CHI2_FLOOR`` (the
    calibration's own sampling error, as the rate tests' band). Request ``i`` in cell ``x`` contributes

        L_i = q_i(x) / (p(x) S_i),   S_i = 1 + sqrt(rho * chi2(q_i, p)),

    where ``q_i`` is a plug-in estimate of the live distribution from the requests *before* ``i`` (the last
    ~``window`` observations, starting from ``prior`` pseudo-observations of ``p``). For every ``P`` in the
    null set ``E_P[q(X)/p(X)] = 1 + sum_x (P(x) - p(x)) (q(x)/p(x) - 1) <= S`` (Cauchy-Schwarz), so
    ``E[L_i | past] <= 1``: ``L`` is an e-value, usable in :class:`EDetector` like a likelihood ratio
    with a fixed alternative, but betting on whatever the live distribution has become (no size or
    direction to guess). A request with no observation (cell ``-1``) contributes ``L = 1``.
    """

    def __init__(self, counts: np.ndarray, window: float = WINDOW, prior: float = PRIOR,
                 level: float = NULL_LEVEL, floor: float = CHI2_FLOOR):
        counts = np.asarray(counts, dtype=np.float64)
        n = counts.sum()
        self.p = (counts + 0.5) / (n + 0.5 * len(counts))
        self.rho = chi2_quantile(len(counts) - 1, level) / max(n, 1.0) + floor
        self.prior = prior
        self.decay = 1.0 - 1.0 / window
        self.live = np.zeros(len(counts))  # exponentially forgotten live counts

    def log_ratios(self, cells: np.ndarray) -> np.ndarray:
        """``log L`` of each request of a block (``cells``: the observed cell, ``-1`` for none), in order."""
        seen = cells >= 0
        at = np.flatnonzero(seen)
        onehot = np.zeros((len(cells), len(self.p)))
        onehot[at, cells[at]] = 1.0
        before = np.cumsum(onehot, axis=0) - onehot
        q = self.live + before + self.prior * self.p
        q /= q.sum(axis=1, keepdims=True)
        ratio = q / self.p
        spread = 1.0 + np.sqrt(self.rho * ((ratio - 1.0) ** 2 @ self.p))
        out = np.zeros(len(cells))
        out[at] = np.log(ratio[at, cells[at]] / spread[at])
        self.live = (self.live + onehot.sum(axis=0)) * self.decay ** len(at)
        return out
