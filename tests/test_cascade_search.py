"""Cascade search on recorded logits: the front is the true optimum of an exhaustive evaluation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stagewise.calibration import fit_temperature
from stagewise.converters.search import Candidate, choose, search_cascades, sequences
from stagewise.errors import CalibrationError


def _toy_candidates(n: int = 14, classes: int = 3, seed: int = 0) -> tuple[list[Candidate], np.ndarray]:
    """Four stages of rising cost and skill (logits pulled towards the target by a growing margin)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    out = []
    for k, (cost, skill) in enumerate([(1.0, 0.5), (2.5, 1.0), (4.0, 1.6), (7.0, 2.5)]):
        logits = rng.normal(0, 1, (n, classes))
        logits[np.arange(n), targets] += skill
        out.append(Candidate(f"s{k}", logits, cost, group="g" if k in (1, 2) else None))
    return out, targets


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def _exhaustive(candidates, targets, max_stages, temps) -> list[tuple[float, float]]:
    """Every cascade (cheapest first, no group twice), combine mode and threshold set, evaluated directly."""
    by_cost = sorted(range(len(candidates)), key=lambda i: candidates[i].cost)
    outcomes = []
    for k in range(1, max_stages + 1):
        for seq in itertools.combinations(by_cost, k):
            groups = [candidates[i].group for i in seq if candidates[i].group]
            if len(groups) != len(set(groups)):
                continue
            for combine in ("own", "mean_probs"):
                own = [_softmax(candidates[i].logits, temps[i]) for i in seq]
                deciding = [np.mean(own[:j + 1], axis=0) if combine == "mean_probs" and j else own[j]
                            for j in range(k)]
                scores = [p.max(axis=1) for p in deciding]
                right = [p.argmax(axis=1) == targets for p in deciding]
                cum = np.cumsum([candidates[i].cost for i in seq])
                choices = [sorted(set(s)) + [np.inf] for s in scores[:-1]]
                for thr in itertools.product(*choices):
                    acc = cost = 0.0
                    for n in range(len(targets)):
                        j = next((j for j in range(k - 1) if scores[j][n] >= thr[j]), k - 1)
                        acc += right[j][n]
                        cost += cum[j]
                    outcomes.append((cost / len(targets), acc / len(targets)))
    return outcomes


def _front(outcomes):
    front = []
    for cost, acc in sorted(outcomes, key=lambda o: (o[0], -o[1])):
        if not front or acc > front[-1][1] + 1e-12:
            front.append((cost, acc))
    return front


@pytest.mark.parametrize("fit", [False, True])
def test_search_front_is_the_exhaustive_front(fit):
    candidates, targets = _toy_candidates()
    temps = [fit_temperature(c.logits, targets=targets) if fit else 1.0 for c in candidates]
    reference = _front(_exhaustive(candidates, targets, 3, temps))
    result = search_cascades(candidates, targets, max_stages=3, fit_temperatures=fit)
    got = [(p.mean_cost, p.accuracy) for p in result.front]
    assert np.allclose(got, reference)
    for target in (0.5, 0.7, 0.85, max(a for _, a in reference)):
        best = min(c for c, a in reference if a >= target - 1e-12)
        assert choose(result.front, target).mean_cost == pytest.approx(best)
    assert result.temperatures == pytest.approx(dict(zip([c.name for c in candidates], temps)))


def test_front_points_name_valid_cascades():
    candidates, targets = _toy_candidates()
    result = search_cascades(candidates, targets, max_stages=3)
    costs = {c.name: c.cost for c in candidates}
    for p in result.front:
        assert [costs[s] for s in p.stages] == sorted(costs[s] for s in p.stages)
        assert not {"s1", "s2"} <= set(p.stages)
        assert len(p.thresholds) == len(p.stages) and sum(p.exit_rates) == pytest.approx(1.0)
        assert p.to_dict()["thresholds"][-1] is None
    assert len(sequences(candidates, 3)) == 4 + 5 + 2
    assert result.cascades == 4 + 2 * (5 + 2)
    assert result.best_single() == "s3"


def test_search_errors_say_what_to_fix():
    candidates, targets = _toy_candidates()
    with pytest.raises(CalibrationError, match="unique"):
        search_cascades([candidates[0], candidates[0]], targets)
    with pytest.raises(CalibrationError, match="combine"):
        search_cascades(candidates, targets, combines=("max",))
    with pytest.raises(CalibrationError, match="allow a larger drop"):
        choose(search_cascades(candidates[:1], targets).front, 1.01)


def test_search_table_shows_a_spread_of_a_long_front_with_the_chosen_point():
    from rich.console import Console

    from stagewise.reports import search_tables

    candidates, targets = _toy_candidates(n=40)
    result = search_cascades(candidates, targets, max_stages=3)
    assert len(result.front) > 8
    chosen = result.front[3]
    record = {"candidates": [{"name": c.name, "size": [8, 8], "adaptation": "none", "cost_ms": c.cost,
                              "accuracy": result.accuracy[c.name], "temperature": 1.0} for c in candidates],
              "cascades_searched": result.cascades, "front": [p.to_dict() for p in result.front], "chosen": 3,
              "target_drop": 0.005, "reference": {"candidate": "s3", "accuracy": 0.9}, "n": 40, "timing_images": 5}
    _, front = search_tables(record, max_rows=5)
    assert front.row_count == 6 and "6 of" in front.caption
    console = Console(width=200, record=True)
    console.print(front)
    text = console.export_text()
    assert " > ".join(chosen.stages) in text and "*" in text
