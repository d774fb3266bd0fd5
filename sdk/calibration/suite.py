"""The calibration suite: from raw per-stage logits to exit rules and named operating points.

:func:`calibrate_stages` (numpy only; used by the converters and by ``stagewise calibrate``):

* per-stage temperature scaling fitted by NLL before any threshold is chosen
  (:mod:`stagewise.calibration.temperature`);
* targets: the labels, or without labels the full model's own answers (agreement with the last
  stage; see ``docs/calibration.md`` for when that is appropriate);
* exit scores of any kind, including the learned score (fitted on a separate part of the images);
* goals (:class:`~stagewise.calibration.goals.Goal`): an accuracy drop, a mean-cost budget,
  Savchenko's false-acceptance rate per stage (:mod:`stagewise.calibration.bh`) and a statistical
  guarantee (:mod:`stagewise.calibration.risk`), plus the Pareto front as named points, each point
  searched exactly on an :class:`~stagewise.calibration.table.ExitTable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..datasets import stratified_indices
from ..errors import CalibrationError, registered
from ..exits import (LearnedExitScore, SCORES, all_stage_scores, softmax, stage_features, stage_probabilities,
                     wrong_class_scores)
from .bh import bh_thresholds
from .goals import Goal, Settings, threshold_point
from .risk import control, loss_matrix
from .table import ExitTable, Outcome, spread
from .temperature import fit_temperature


@dataclass
class Calibration:
    """Everything :func:`calibrate_stages` decided: new exit rules, models, points and a record."""

    exits: list[dict]
    models: list[LearnedExitScore | None]
    points: list[dict]
    default: str
    record: dict
    table: ExitTable
    guarantee: dict | None = None
    extra: dict = field(default_factory=dict)


def _split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split stratified by target: (fit part, rest)."""
    fit = stratified_indices(np.asarray(targets), [fraction], seed)[0]
    rest = np.setdiff1d(np.arange(len(targets)), fit)
    if not len(fit) or not len(rest):
        raise CalibrationError(f"too few calibration images ({len(targets)}) to split {fraction:.0%} off for fitting")
    return fit, rest


def fit_temperatures(stage_logits: list[np.ndarray], targets: np.ndarray | None, current: list[float]) -> list[float]:
    """Per-stage temperatures by NLL: against the labels, or without labels against the last stage's softmax.

    Without labels the last stage keeps its temperature (it is its own target).
    """
    if targets is not None:
        return [fit_temperature(lg, targets=targets) for lg in stage_logits]
    teacher = softmax(stage_logits[-1], current[-1])
    return [fit_temperature(lg, soft=teacher) for lg in stage_logits[:-1]] + [float(current[-1])]


def calibrate_stages(stage_logits: list[np.ndarray], exits: list[dict], stage_costs: np.ndarray,
                     targets: np.ndarray | None = None, goal: Goal = Goal(), settings: Settings = Settings(),
                     cost_unit: str = "ms", float_logits: list[np.ndarray] | None = None) -> Calibration:
    """Calibrate a K-stage sequence from its raw logits on held-out images.

    ``exits`` are the manifest stages' ``exit`` entries (score, temperature, combine); the
    returned :class:`Calibration` holds the new entries (temperatures fitted, score switched),
    the learned exit score models (``None`` for other scores), the operating points (``full``,
    ``drop-*``, ``budget-*``, ``alpha-*``, ``pareto-*`` and the goal's point) and the record for
    the manifest's ``calibration``. ``targets`` are the images' integer labels;
    ``None`` calibrates against the full model's answers.

    ``float_logits``: the same stages' logits in float, for a bundle whose stages are quantized. The
    drops are then measured from the float full model (its top-1 on the labels; without labels the
    targets are the float full model's answers), so the quantization's loss counts inside a target
    drop instead of on top of it; a drop the quantized stages cannot reach gives the most accurate
    point, and its goal says so (``reached: false``).
    """
    k = len(stage_logits)
    n = len(stage_logits[0])
    if n < 2:
        raise CalibrationError("calibration needs images; got fewer than two")
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int64)
        if len(targets) != n:
            raise CalibrationError(f"{len(targets)} labels for {n} images")
    exits = [dict(e) for e in exits]
    for e in exits:
        e.pop("model", None)
    if settings.score is not None:
        score = registered(SCORES, "exit score", settings.score, CalibrationError)
        for e in exits[:-1]:
            e["score"] = settings.score
        if score.model is None:  # the last stage never exits: it needs no model
            exits[-1]["score"] = settings.score
    kinds = [e["score"] for e in exits]
    combine = [e.get("combine", "own") for e in exits]
    learned = any(SCORES[kind].model is not None for kind in kinds[:-1])
    if SCORES[kinds[-1]].model is not None:
        exits[-1]["score"] = kinds[-1] = "max_softmax"  # the last stage never exits: it needs no model

    # What a stage must answer: the targets, or the full model's own answers (computed with the current temperatures first).
    temps = [float(e["temperature"]) for e in exits]
    rough = stage_probabilities(stage_logits, temps, combine)[-1].argmax(axis=1)
    strata = targets if targets is not None else rough
    needs_split = learned or goal.kind == "risk"
    fit_idx, rest_idx = _split(strata, settings.tune_fraction, settings.seed) if needs_split else (np.arange(n), np.arange(n))

    if settings.fit_temperature:
        fit_on = fit_idx if goal.kind == "risk" else (np.arange(n) if not learned else fit_idx)
        temps = fit_temperatures([lg[fit_on] for lg in stage_logits], None if targets is None else targets[fit_on], temps)
        for e, t in zip(exits, temps):
            e["temperature"] = float(t)
    probs = stage_probabilities(stage_logits, temps, combine)
    answers = np.stack([p.argmax(axis=1) for p in probs])
    full_answer = answers[-1]
    float_answer = None
    if float_logits is not None:
        float_answer = stage_probabilities(float_logits, temps, combine)[-1].argmax(axis=1)
    truth = targets if targets is not None else (full_answer if float_answer is None else float_answer)
    correct = answers == truth[None, :]
    agree = answers == full_answer[None, :]

    models: list[LearnedExitScore | None] = [None] * k
    if learned:
        feats = stage_features(stage_logits, temps)
        for j in range(k - 1):
            model = SCORES[kinds[j]].model
            if model is not None:
                models[j] = model.fit(feats[j][fit_idx], correct[j][fit_idx])
    scores = all_stage_scores(kinds, stage_logits, temps, combine, models)

    # Thresholds are chosen on images the fitted parts never saw when a learned score is used.
    sel = rest_idx if learned else np.arange(n)
    costs = np.asarray(stage_costs, dtype=np.float64)
    agree_table = ExitTable(scores[:, sel], agree[:, sel], costs, answers[:, sel])
    label_table = ExitTable(scores[:, sel], correct[:, sel], costs, answers[:, sel]) if targets is not None else None
    table = label_table if label_table is not None else agree_table
    reference = "labels" if targets is not None else "full_model_agreement"
    if float_answer is not None and targets is None:
        reference = "float_full_model_agreement"

    def point(name, thr, g):
        return threshold_point(name, np.asarray(thr, dtype=np.float64), g, agree_table, label_table, cost_unit)

    points = [point("full", np.full(k, np.inf), {"kind": "full"})]
    full_acc = table.full().accuracy
    if float_answer is not None:  # the float full model's top-1 (or, without labels, agreement with itself)
        full_acc = float((float_answer[sel] == truth[sel]).mean())
    cached: list[list[Outcome]] = []

    def front() -> list[Outcome]:  # traced once, shared by every constrained search
        if not cached:
            cached.append(table.front())
        return cached[0]

    drops = sorted(set(settings.target_drops) | ({goal.value} if goal.kind == "drop" else set()))
    for drop in drops:
        best = max(o.accuracy for o in front())
        o = table.min_cost(min(full_acc - drop, best), front())
        described = {"kind": "max_accuracy_drop", "drop": drop, "reference_accuracy": full_acc, "reference": reference}
        if float_answer is not None:
            described.update(reference_model="float", reached=bool(best >= full_acc - drop - 1e-12))
        points.append(point(f"drop-{100 * drop:g}pt", o.thresholds, described))
    budgets = sorted(set(settings.budgets) | ({goal.value} if goal.kind == "budget" else set()))
    for budget in budgets:
        o = table.max_accuracy(budget, front())
        points.append(point(f"budget-{budget:g}{cost_unit}", o.thresholds,
                            {"kind": "max_mean_cost", "budget": budget, "reference": reference}))
    alphas = sorted(set(settings.alphas) | ({goal.value} if goal.kind == "alpha" else set()))
    if alphas:
        wrong = np.stack([wrong_class_scores(kinds[j], probs[j][sel], stage_logits[j][sel], truth[sel], scores[j][sel])
                          for j in range(k - 1)]) if k > 1 else np.zeros((0, len(sel)))
        floor = scores[:, sel].min(axis=1)
        for alpha in alphas:
            thr = bh_thresholds(wrong, alpha, floor)
            faithful = all(SCORES[kinds[j]].per_class is not None for j in range(k - 1))
            points.append(point(f"alpha-{alpha:g}", thr,
                                {"kind": "false_acceptance_rate", "alpha": alpha, "reference": reference,
                                 "rule": "floor(alpha*m*n/M)-th largest maximal wrong-class score at stage m"
                                 + ("" if faithful else " (score of wrong answers: the score is not per class)"),
                                 "n": int(len(sel))}))
    for i, o in enumerate(spread(front() if settings.front_points > 0 else [], settings.front_points), start=1):
        points.append(point(f"pareto-{i}", o.thresholds, {"kind": "pareto", "rank": i, "reference": reference}))

    guarantee = None
    if goal.kind == "risk":
        loss = loss_matrix(answers, full_answer, targets, goal.risk)
        result = control(scores, loss, costs, fit_idx, rest_idx, goal.value, goal.delta)
        guarantee = result.record(goal.risk, len(fit_idx))
        p = point(goal.point_name(cost_unit), np.array(result.thresholds),
                  {"kind": "risk", "risk": goal.risk, "epsilon": goal.value, "delta": goal.delta})
        p["guarantee"] = guarantee
        points.append(p)

    # de-duplicate names (a goal point may coincide with a default one)
    unique: dict[str, dict] = {}
    for p in points:
        unique[p["name"]] = p
    points = list(unique.values())
    oracle = table.oracle()
    record = {
        "method": "exact per-stage threshold search (coordinate descent)"
                  + ("; Savchenko false-acceptance thresholds (Benjamini-Hochberg)" if alphas else "")
                  + ("; learn-then-test risk control" if goal.kind == "risk" else ""),
        "goal": {k_: v for k_, v in goal.__dict__.items() if v is not None},
        "targets": reference,
        "n": int(n), "n_thresholds": int(len(sel)), "n_fit": int(len(fit_idx)) if needs_split else int(n),
        "seed": settings.seed,
        "temperature": "fitted by NLL per stage" if settings.fit_temperature else "kept",
        "temperatures": [float(t) for t in temps],
        "scores": kinds,
        "stage_agreement": [float(a.mean()) for a in agree[:, sel]],
        "oracle": {"accuracy": oracle.accuracy, "mean_cost": oracle.mean_cost, "exit_rates": list(oracle.exit_rates)},
    }
    if float_answer is not None:
        record["float_reference_accuracy"] = full_acc
        record["drops_from"] = "the float full model"
    if targets is not None:
        record["reference_accuracy"] = float(correct[-1][sel].mean())
        record["stage_accuracy"] = [float(c.mean()) for c in correct[:, sel]]
    else:
        record["reference_accuracy"] = 1.0
        record["note"] = ("no labels: accuracy means agreement with running every stage" if float_answer is None else
                          "no labels: accuracy means agreement with the float full model")
    return Calibration(exits=exits, models=models, points=points, default=goal.point_name(cost_unit), record=record,
                       table=table, guarantee=guarantee)
