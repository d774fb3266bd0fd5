"""The calibration suite: Savchenko/BH thresholds, temperatures, learned scores, goals, label-free mode."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.calibration import (ExitTable, Goal, Settings, bh_rank, bh_thresholds, calibrate_stages, pareto)
from stagewise.errors import CalibrationError
from stagewise.exits import (LEARNED_FEATURES, LearnedExitScore, all_stage_scores, exit_scores, softmax,
                             stage_features, stage_probabilities, wrong_class_scores)
from stagewise.calibration.temperature import fit_temperature, nll


def synthetic_logits(n=600, k=3, classes=5, seed=0):
    """Stages that get better with depth; logits are overconfident (scaled by 3) at every stage."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    shared = rng.normal(size=(n, classes))  # a per-image nuisance all stages see: difficulty is shared
    out = []
    for j, signal in enumerate(np.linspace(0.8, 2.5, k)):
        z = rng.normal(size=(n, classes)) + 0.8 * shared
        z[np.arange(n), labels] += signal
        out.append(3.0 * z)
    return out, labels


EXITS = [{"score": "max_softmax", "temperature": 1.0, "combine": "own"} for _ in range(3)]
COSTS = np.array([1.0, 2.0, 4.0])


# --- Savchenko's rule ---------------------------------------------------------------------

def test_bh_thresholds_hand_example():
    # n = 10 held-out images, M = 3 stages (two that can exit)
    wrong = np.array([[0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.05],
                      [2.0, 1.0, 3.0, 0.5, 4.0, 1.5, 2.5, 0.1, 3.5, 0.2]])
    # alpha = 0.3: stage 1 takes the floor(0.3 * 1 * 10 / 3) = 1st largest, stage 2 the floor(0.3 * 2 * 10 / 3) = 2nd largest
    assert (bh_rank(0.3, 1, 3, 10), bh_rank(0.3, 2, 3, 10)) == (1, 2)
    np.testing.assert_array_equal(bh_thresholds(wrong, 0.3), [0.9, 3.5, np.inf])
    # alpha = 0.6: ranks 2 and 4 -> 0.8 and 2.5
    np.testing.assert_array_equal(bh_thresholds(wrong, 0.6), [0.8, 2.5, np.inf])
    # alpha = 0.1: ranks 0 and 0 -> no stage may exit
    np.testing.assert_array_equal(bh_thresholds(wrong, 0.1), [np.inf, np.inf, np.inf])
    # at most alpha * m / M of the images have a wrong class at or above stage m's threshold
    for alpha in (0.3, 0.6, 0.9):
        thr = bh_thresholds(wrong, alpha)
        for m in (1, 2):
            assert (wrong[m - 1] >= thr[m - 1]).mean() <= alpha * m / 3 + 1e-12


def test_bh_generic_scores_may_let_everything_exit():
    wrong = np.array([[-np.inf, 0.4, -np.inf, -np.inf]])  # one wrong answer in four
    # alpha = 1, M = 2: rank floor(1 * 1 * 4 / 2) = 2 > one wrong answer: every image may exit
    np.testing.assert_array_equal(bh_thresholds(wrong, 1.0, floor=np.array([0.1, 0.0])), [0.1, np.inf])


def test_wrong_class_scores():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    probs = softmax(logits)
    targets = np.array([0, 2])
    np.testing.assert_allclose(wrong_class_scores("max_logit", probs, logits, targets), [1.0, 2.0])
    np.testing.assert_allclose(wrong_class_scores("max_softmax", probs, logits, targets), [probs[0, 1], probs[1, 1]])
    margin = wrong_class_scores("margin", probs, logits, targets)
    assert margin[0] == -np.inf and margin[1] == pytest.approx(probs[1, 1] - probs[1, 2])


# --- temperatures -------------------------------------------------------------------------

def test_temperature_recovers_the_generating_one():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(4000, 6))
    p = softmax(z, 2.5)
    labels = (p.cumsum(1) > rng.random((4000, 1))).argmax(1)
    t = fit_temperature(z, targets=labels)
    assert t == pytest.approx(2.5, rel=0.12)
    assert nll(z, t, labels) <= min(nll(z, 1.0, labels), nll(z, 4.0, labels))
    assert fit_temperature(z, soft=softmax(z, 0.7)) == pytest.approx(0.7, rel=1e-3)
    with pytest.raises(ValueError, match="exactly one"):
        fit_temperature(z)


# --- learned exit score --------------------------------------------------------------------

def test_learned_score_roundtrip_and_parity(tmp_path):
    logits, labels = synthetic_logits()
    feats = stage_features(logits, [1.0] * 3)
    assert feats[1].shape == (600, len(LEARNED_FEATURES))
    right = logits[1].argmax(1) == labels
    model = LearnedExitScore.fit(feats[1], right)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = LearnedExitScore.load(path)
    np.testing.assert_allclose(loaded(feats[1]), model(feats[1]))
    # the executor's per-stage computation (running sum of probabilities) equals the offline one
    total = softmax(logits[0]) + softmax(logits[1])
    probs = stage_probabilities(logits, [1.0] * 3, ["own"] * 3)
    online = exit_scores("learned", probs[1], logits[1], 1.0, total, 1, loaded)
    offline = all_stage_scores(["max_softmax", "learned", "max_softmax"], logits, [1.0] * 3, ["own"] * 3,
                               [None, loaded, None])[1]
    np.testing.assert_allclose(online, offline)
    # it predicts correctness better than chance and at least as well as the top probability
    auc = lambda s: (s[right][:, None] > s[~right][None, :]).mean()  # noqa: E731
    assert auc(model(feats[1])) >= auc(probs[1].max(1)) - 0.01 and auc(model(feats[1])) > 0.7


def test_learned_score_file_is_checked(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, kind=np.array("logistic"), features=np.array(["a"]), mean=np.zeros(1), scale=np.ones(1),
             weights=np.zeros(1), bias=np.array(0.0))
    with pytest.raises(ValueError, match="recalibrate"):
        LearnedExitScore.load(path)


# --- goals ------------------------------------------------------------------------------

def test_goals_meet_their_constraints_on_the_data_fitted():
    logits, labels = synthetic_logits()
    result = calibrate_stages(logits, EXITS, COSTS, labels, Goal("drop", 0.01),
                              Settings(budgets=(2.0, 3.0), alphas=(0.05, 0.2), front_points=5))
    points = {p["name"]: p for p in result.points}
    full = points["full"]["expected"]["accuracy"]
    assert result.default == "drop-1pt"
    for drop in (0.0, 0.005, 0.01, 0.02):
        assert points[f"drop-{100 * drop:g}pt"]["expected"]["accuracy"] >= full - drop - 1e-12
    for budget in (2.0, 3.0):
        assert points[f"budget-{budget:g}ms"]["expected"]["mean_cost"] <= budget + 1e-12
    front = [points[f"pareto-{i}"]["expected"] for i in range(1, 6)]
    assert [f["mean_cost"] for f in front] == sorted(f["mean_cost"] for f in front)
    assert [f["accuracy"] for f in front] == sorted(f["accuracy"] for f in front)
    # temperatures were fitted (logits are 3x overconfident) before thresholds were chosen
    assert all(t > 1.5 for t in result.record["temperatures"])
    assert all(e["temperature"] > 1.5 for e in result.exits)
    # Savchenko's points: at stage m, at most alpha * m / M of the images exit with a wrong answer
    probs = stage_probabilities(logits, result.record["temperatures"], ["own"] * 3)
    scores = np.stack([p.max(1) for p in probs])
    for alpha in (0.05, 0.2):
        thr = np.array([np.inf if t is None else t for t in points[f"alpha-{alpha:g}"]["thresholds"]])
        for m in (1, 2):
            wrong_exit = (scores[m - 1] >= thr[m - 1]) & (probs[m - 1].argmax(1) != labels)
            assert wrong_exit.mean() <= alpha * m / 3 + 1e-12
    # every point's thresholds reproduce its expected numbers
    table = ExitTable(scores, np.stack([p.argmax(1) == labels for p in probs]), COSTS)
    for p in result.points:
        thr = np.array([np.inf if t is None else t for t in p["thresholds"]])
        assert table.evaluate(thr).accuracy == pytest.approx(p["expected"]["accuracy"])


def test_budget_search_is_exact_for_two_stages():
    logits, labels = synthetic_logits(n=300, k=2, seed=4)
    exits = EXITS[:2]
    result = calibrate_stages(logits, exits, COSTS[:2], labels, Goal("budget", 2.0), Settings(fit_temperature=False))
    got = next(p for p in result.points if p["name"] == "budget-2ms")["expected"]
    scores = softmax(logits[0]).max(1)
    correct = np.stack([lg.argmax(1) == labels for lg in logits])
    table = ExitTable(np.stack([scores, np.ones(300)]), correct, COSTS[:2])
    brute = max((o for o in (table.evaluate(np.array([t, np.inf])) for t in np.append(np.unique(scores), np.inf))
                 if o.mean_cost <= 2.0 + 1e-12), key=lambda o: o.accuracy)
    assert got["accuracy"] == pytest.approx(brute.accuracy)


def test_risk_goal_records_its_guarantee():
    logits, labels = synthetic_logits(n=1000)
    result = calibrate_stages(logits, EXITS, COSTS, labels, Goal("risk", 0.05, 0.1, "error_increase"), Settings())
    point = next(p for p in result.points if p["name"] == result.default)
    g = point["guarantee"]
    assert result.default == "risk-error-5pt-d0.1"
    assert (g["epsilon"], g["delta"], g["n"] + g["n_tune"], g["risk"]) == (0.05, 0.1, 1000, "error_increase")
    assert g["upper_bound"] <= 0.05 or g["candidates_passed"] <= 1
    assert point["expected"]["mean_cost"] < result.points[0]["expected"]["mean_cost"]  # it does exit early


def test_label_free_needs_no_labels():
    logits, labels = synthetic_logits()
    result = calibrate_stages(logits, EXITS, COSTS, None, Goal("drop", 0.02), Settings(alphas=(0.1,)))
    assert result.record["targets"] == "full_model_agreement"
    assert result.exits[-1]["temperature"] == 1.0  # the last stage is its own target: kept
    for p in result.points:
        assert "accuracy" not in p["expected"]
    drop = next(p for p in result.points if p["name"] == "drop-2pt")["expected"]
    assert drop["agreement"] >= 0.98 - 1e-12 and drop["mean_cost"] < 7.0
    # agreement with the full model tracks accuracy: the label-free point loses little real accuracy
    probs = stage_probabilities(logits, [e["temperature"] for e in result.exits], ["own"] * 3)
    table = ExitTable(np.stack([p.max(1) for p in probs]), np.stack([p.argmax(1) == labels for p in probs]), COSTS)
    thr = np.array([np.inf if t is None else t for t in next(p for p in result.points if p["name"] == "drop-2pt")["thresholds"]])
    assert table.evaluate(thr).accuracy >= table.full().accuracy - 0.03


def test_learned_score_points_are_chosen_on_unseen_images():
    logits, labels = synthetic_logits(n=800)
    result = calibrate_stages(logits, EXITS, COSTS, labels, Goal("drop", 0.01), Settings(score="learned"))
    assert [e["score"] for e in result.exits] == ["learned", "learned", "max_softmax"]
    assert result.models[0] is not None and result.models[2] is None
    assert result.record["n_thresholds"] == 400 and result.record["n_fit"] == 400
    assert pareto([result.table.evaluate(np.full(3, np.inf))]) != []


def test_bad_requests_are_refused():
    logits, labels = synthetic_logits(n=50)
    with pytest.raises(CalibrationError, match="unknown exit score"):
        calibrate_stages(logits, EXITS, COSTS, labels, Goal("drop", 0.01), Settings(score="vibes"))
    with pytest.raises(CalibrationError, match="needs delta"):
        Goal("risk", 0.05)
    with pytest.raises(CalibrationError, match="unknown goal"):
        Goal("speed", 1.0)
