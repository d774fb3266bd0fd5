"""What a prediction returns: the answer (:class:`Prediction`) and what happened at each stage (:class:`StageRecord`).

The executor's stage loop writes one plain tuple per stage it considered (a *step*, laid out as
the fields of :class:`StageRecord` after ``stage_name``, with the stage index first); the
:class:`StageRecord` objects of :attr:`Prediction.trace` are built from them on first access,
so a caller that never reads the trace never pays for it.

:meth:`Prediction.to_dict` is the one JSON form of a prediction: ``stagewise run --json``, the
service's ``/v1/classify`` answer and the frame logs of :mod:`~stagewise.runtimes.stream` all write
it (each adds its own keys around it), and :mod:`~stagewise.runtimes.trace_log` reads it back.
A stage is named ``stage_name`` and numbered ``stage_index`` (0-based) everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from stagewise.deprecation import renamed_attribute

PREDICTION_KEYS = ("label", "class_name", "score", "stage_index", "stage_name", "elapsed_ms", "budget_ms",
                   "budget_limited", "operating_point")
"""The keys of :meth:`Prediction.to_dict` always present, in order."""


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
    ``stage_name`` names the stage (``stage`` is its deprecated name).
    """

    stage_name: str
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

    stage = renamed_attribute("stage", "stage_name")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the record (one entry of a prediction's ``trace``)."""
        out = asdict(self)
        if self.box is not None:
            out["box"] = list(self.box)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageRecord":
        """A record from its JSON form; a trace written before 0.2 names the stage ``stage``."""
        fields = cls.__dataclass_fields__
        values = {k: v for k, v in d.items() if k in fields}
        if "stage_name" not in values and "stage" in d:
            values["stage_name"] = d["stage"]
        if values.get("box") is not None:
            values["box"] = tuple(values["box"])
        return cls(**values)

    def explain(self) -> str:
        """One line saying why this stage ran or not."""
        if self.reason == "planned_skip":
            return (f"{self.stage_name}: skipped so that a later stage fits: {self.left_ms:.2f} ms left "
                    f"(this one needs {self.needed_ms:.2f})")
        if self.reason == "over_budget":
            return (f"{self.stage_name}: skipped, needs {self.needed_ms:.2f} ms (predicted {self.predicted_ms:.2f}) "
                    f"but {self.left_ms:.2f} ms left")
        if self.reason == "cancelled":
            return (f"{self.stage_name}: cancelled after {self.latency_ms:.2f} ms when the budget ran out "
                    f"({self.left_ms:.2f} ms were left, it needed {self.needed_ms:.2f})")
        ran = f"{self.stage_name}: ran in {self.latency_ms:.2f} ms -> {self.decision}"
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
    """The answer for one image: target ``label`` (class ``name``) with ``score``, given by the stage
    ``stage_index`` (named ``stage_name``) after ``elapsed_ms``; ``probabilities`` are the answering
    stage's deciding probabilities; ``trace`` has one :class:`StageRecord` per stage considered.
    ``budget_limited``: a budget stopped a later stage; ``budget_ms`` and ``operating_point`` are what
    the request ran under. ``stage`` is the deprecated name of ``stage_index``."""

    __slots__ = ("label", "name", "score", "stage_index", "stage_name", "elapsed_ms", "probabilities",
                 "budget_limited", "budget_ms", "operating_point", "_trace", "_steps", "_names")

    def __init__(self, label: int, name: str, score: float, stage_index: int, elapsed_ms: float,
                 trace: Sequence[StageRecord], probabilities: np.ndarray, budget_limited: bool = False,
                 budget_ms: float | None = None, operating_point: str | None = None, stage_name: str | None = None):
        self.label, self.name, self.score, self.elapsed_ms = label, name, score, elapsed_ms
        self.stage_index, self.stage_name = stage_index, stage_name
        self.probabilities, self.budget_limited, self.budget_ms = probabilities, budget_limited, budget_ms
        self.operating_point = operating_point
        self._trace: tuple[StageRecord, ...] | None = tuple(trace)
        self._steps: Sequence[Step] = ()
        self._names: Sequence[str] = ()

    @classmethod
    def from_steps(cls, label: int, name: str, score: float, stage_index: int, elapsed_ms: float,
                   steps: Sequence[Step], names: Sequence[str], probabilities: np.ndarray, budget_limited: bool,
                   budget_ms: float | None, operating_point: str | None) -> "Prediction":
        """A prediction whose trace is built from the stage loop's ``steps`` (stage ``k`` named ``names[k]``) when read."""
        self = cls.__new__(cls)
        self.label, self.name, self.score, self.elapsed_ms = label, name, score, elapsed_ms
        self.stage_index, self.stage_name = stage_index, names[stage_index]
        self.probabilities, self.budget_limited, self.budget_ms = probabilities, budget_limited, budget_ms
        self.operating_point = operating_point
        self._trace, self._steps, self._names = None, steps, names
        return self

    stage = renamed_attribute("stage", "stage_index")

    @property
    def trace(self) -> tuple[StageRecord, ...]:
        """What happened at every stage considered, in order."""
        if self._trace is None:
            names = self._names
            self._trace = tuple(StageRecord(names[s[0]], *s[1:]) for s in self._steps)
        return self._trace

    def stage_answers(self) -> list[tuple[float | None, int | None]]:
        """Each considered stage's ``(score, label)`` in order, as in :attr:`trace` but without building its
        records (the drift monitor reads this on every request)."""
        if self._trace is not None:
            return [(r.score, r.label) for r in self._trace]
        return [(s[2], s[3]) for s in self._steps]

    @property
    def deadline_missed(self) -> bool:
        """True when a per-request budget was given and the answer took longer."""
        return self.budget_ms is not None and self.elapsed_ms > self.budget_ms

    def top_k(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most probable classes with their probabilities."""
        order = np.argsort(-self.probabilities)[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]

    def to_dict(self, trace: bool = True, top_k: int = 0, classes: Sequence[str] = ()) -> dict[str, Any]:
        """The JSON form of the prediction: ``label`` (the target), ``class_name``, ``score``, ``stage_index``,
        ``stage_name``, ``elapsed_ms``, ``budget_ms``, ``budget_limited``, ``operating_point``, and when asked
        ``top_k`` (the ``top_k`` most probable classes, named from ``classes``) and ``trace``
        (:meth:`StageRecord.to_dict` of every stage considered)."""
        out = dict(zip(PREDICTION_KEYS, (self.label, self.name, self.score, self.stage_index, self.stage_name,
                                         self.elapsed_ms, self.budget_ms, self.budget_limited, self.operating_point)))
        if top_k:
            out["top_k"] = [{"label": i, "class_name": classes[i], "probability": p} for i, p in self.top_k(top_k)]
        if trace:
            out["trace"] = [r.to_dict() for r in self.trace]
        return out

    def __repr__(self) -> str:
        return (f"Prediction(label={self.label}, name={self.name!r}, score={self.score:.4f}, "
                f"stage_index={self.stage_index}, stage_name={self.stage_name!r}, "
                f"elapsed_ms={self.elapsed_ms:.3f}, budget_limited={self.budget_limited}, "
                f"operating_point={self.operating_point!r})")
