"""What a prediction returns: the answer (:class:`Prediction`) and what happened at each stage (:class:`StageRecord`).

The executor's stage loop writes one plain tuple per stage it considered (a *step*, laid out as
the fields of :class:`StageRecord` after ``stage``, with the stage index first); the
:class:`StageRecord` objects of :attr:`Prediction.trace` are built from them on first access,
so a caller that never reads the trace never pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class StageRecord:
    """What happened at one stage for one prediction.

    ``decision`` is ``"exit"`` (score reached the threshold), ``"continue"``, ``"last"`` (the
    final stage always answers), ``"skipped_budget"`` (not run: predicted to overrun) or
    ``"cancelled_budget"`` (started, then cancelled when the budget ran out: no score).
    ``latency_ms`` is the stage's step time (input preparation, backend call, exit rule);
    ``predicted_ms`` the latency model's quantile for it before it ran. Under a budget,
    ``left_ms`` is what was left of it when the stage was considered and ``needed_ms`` what the
    scheduler reserved for it (prediction x learned margin + time to return); ``reason`` says
    why the stage ran or not: ``"no_budget"``, ``"first"`` (the first stage to run always runs),
    ``"fits"`` (needed <= left), ``"over_budget"`` (needed > left: skipped) or
    ``"planned_skip"`` (skipped so that a later, more accurate stage reading the image fits) or
    ``"cancelled"`` (ran past the budget and was stopped). ``box`` is the patch of the original
    image a patch stage read (left, top, right, bottom pixels; ``None`` for other stages).
    ``ran_on`` is where the runtime really ran the stage: the ONNX Runtime execution provider,
    the OpenVINO execution device(s) or the LiteRT delegate (``None`` for a stage not run).
    """

    stage: str
    decision: str
    score: float | None
    label: int | None
    latency_ms: float | None
    predicted_ms: float | None
    threshold: float | None
    left_ms: float | None = None
    needed_ms: float | None = None
    reason: str | None = None
    box: tuple[float, float, float, float] | None = None
    ran_on: str | None = None

    def explain(self) -> str:
        """One line saying why this stage ran or not."""
        if self.reason == "planned_skip":
            return (f"{self.stage}: skipped so that a later stage fits: {self.left_ms:.2f} ms left "
                    f"(this one needs {self.needed_ms:.2f})")
        if self.reason == "over_budget":
            return (f"{self.stage}: skipped, needs {self.needed_ms:.2f} ms (predicted {self.predicted_ms:.2f}) "
                    f"but {self.left_ms:.2f} ms left")
        if self.reason == "cancelled":
            return (f"{self.stage}: cancelled after {self.latency_ms:.2f} ms when the budget ran out "
                    f"({self.left_ms:.2f} ms were left, it needed {self.needed_ms:.2f})")
        ran = f"{self.stage}: ran in {self.latency_ms:.2f} ms -> {self.decision}"
        if self.score is not None:
            ran += f" (score {self.score:.3f}" + (f" vs {self.threshold:.3f})" if self.threshold is not None else ")")
        if self.reason == "first":
            return ran + f"; the first stage run always runs ({self.left_ms:.2f} ms left, needs {self.needed_ms:.2f})"
        if self.reason == "fits":
            return ran + f"; fitted: needs {self.needed_ms:.2f} ms of {self.left_ms:.2f} ms left"
        return ran


Step = tuple
"""One stage's record as the stage loop writes it: ``(stage index, decision, score, label, latency_ms,
predicted_ms, threshold, left_ms, needed_ms, reason, box, ran_on)``."""


class Prediction:
    """The answer for one image: ``label`` (``name``) with ``score``, given by stage ``stage`` after
    ``elapsed_ms``; ``probabilities`` are the answering stage's deciding probabilities; ``trace``
    has one :class:`StageRecord` per stage considered. ``budget_limited``: a budget stopped a later
    stage; ``budget_ms`` and ``operating_point`` are what the request ran under."""

    __slots__ = ("label", "name", "score", "stage", "elapsed_ms", "probabilities", "budget_limited", "budget_ms",
                 "operating_point", "_trace", "_steps", "_names")

    def __init__(self, label: int, name: str, score: float, stage: int, elapsed_ms: float,
                 trace: Sequence[StageRecord], probabilities: np.ndarray, budget_limited: bool = False,
                 budget_ms: float | None = None, operating_point: str | None = None):
        self.label, self.name, self.score, self.stage, self.elapsed_ms = label, name, score, stage, elapsed_ms
        self.probabilities, self.budget_limited, self.budget_ms = probabilities, budget_limited, budget_ms
        self.operating_point = operating_point
        self._trace: tuple[StageRecord, ...] | None = tuple(trace)
        self._steps: Sequence[Step] = ()
        self._names: Sequence[str] = ()

    @classmethod
    def from_steps(cls, label: int, name: str, score: float, stage: int, elapsed_ms: float, steps: Sequence[Step],
                   names: Sequence[str], probabilities: np.ndarray, budget_limited: bool,
                   budget_ms: float | None, operating_point: str | None) -> "Prediction":
        """A prediction whose trace is built from the stage loop's ``steps`` (stage ``k`` named ``names[k]``) when read."""
        self = cls.__new__(cls)
        self.label, self.name, self.score, self.stage, self.elapsed_ms = label, name, score, stage, elapsed_ms
        self.probabilities, self.budget_limited, self.budget_ms = probabilities, budget_limited, budget_ms
        self.operating_point = operating_point
        self._trace, self._steps, self._names = None, steps, names
        return self

    @property
    def trace(self) -> tuple[StageRecord, ...]:
        """What happened at every stage considered, in order."""
        if self._trace is None:
            names = self._names
            self._trace = tuple(StageRecord(names[s[0]], *s[1:]) for s in self._steps)
        return self._trace

    @property
    def deadline_missed(self) -> bool:
        """True when a per-request budget was given and the answer took longer."""
        return self.budget_ms is not None and self.elapsed_ms > self.budget_ms

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most probable classes with their probabilities."""
        order = np.argsort(-self.probabilities)[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]

    def __repr__(self) -> str:
        return (f"Prediction(label={self.label}, name={self.name!r}, score={self.score:.4f}, stage={self.stage}, "
                f"elapsed_ms={self.elapsed_ms:.3f}, budget_limited={self.budget_limited}, "
                f"operating_point={self.operating_point!r})")
