"""Budget planning for one request: where to start, whether a stage fits, when to stop a running one.

The rules (see :mod:`stagewise.runtimes.latency` for what ``needed`` holds): the first stage
the plan runs always runs; a later stage ``k`` runs when ``needed(k) <= left`` (what is left of
the budget when it is considered), and is skipped otherwise, together with every stage after
it; a stage whose runtime can stop a run is stopped when what was left at its call, less the
time to return and the learned cancel lead, runs out. A cascade whose later stages read the
image may start past cheap stages (:func:`plan_start`) when only that lets a more accurate
stage fit.
"""

from __future__ import annotations

from typing import Sequence

from .latency import LatencyModel
from .records import Step
from .routing import StageRouter


def plan_start(latency: LatencyModel, router: StageRouter, left_ms: float) -> int:
    """Where a request with ``left_ms`` to spend starts.

    A path that starts at stage ``s`` (one that reads the image) and goes on in order reaches
    the deepest stage ``m`` whose needs, summed from ``s``, fit in ``left_ms``. The plan starts
    where the deepest stage is reachable, and at the earliest such start (so early exits and
    combined probabilities still help); it is stage 0 unless skipping cheap stages is the only
    way for a more accurate one to fit. With nothing that fits, stage 0 runs alone.
    """
    margin, ret = latency.margin(), latency.return_overhead()
    count = len(router)
    needs = [latency.predict(k) * margin for k in range(count)]
    best_start, best_reach = 0, -1
    for s in range(count):
        if s and not router.reads_image(s):
            continue  # a carry stage cannot start a path
        used, reach = ret, -1
        for j in range(s, count):
            source = router.fed_by(j)
            if j > s and source is not None and source < s:
                break
            used += needs[j]
            if used > left_ms:
                break
            reach = j
        if reach > best_reach:
            best_start, best_reach = s, reach
    return best_start


def skipped(latency: LatencyModel, cancellable: Sequence[bool], stages: Sequence[int], left_ms: float,
            reason: str) -> list[Step]:
    """The steps of ``stages`` not run (``reason``: ``"over_budget"`` or ``"planned_skip"``)."""
    return [(j, "skipped_budget", None, None, None, latency.predict(j), None, left_ms,
             latency.needed(j, reason == "over_budget" and cancellable[j]), reason, None, None) for j in stages]


def cancel_timer_s(latency: LatencyModel, budget_ms: float, spent_ms: float) -> float:
    """Seconds until a stage called after ``spent_ms`` of a ``budget_ms`` request must be stopped:
    what is left, less the time to return and the learned cancel lead (at least 0)."""
    return max(0.0, budget_ms - spent_ms - latency.return_overhead() - latency.cancel_lead()) / 1e3
