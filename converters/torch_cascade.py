"""PyTorch resolution / model cascades: separate models, each reading the image at its own size."""

from __future__ import annotations

from typing import Sequence

import torch

from .build import StagePlan
from .costs import count_macs, count_params


def cascade_plans(models: Sequence[tuple[str, torch.nn.Module, tuple[int, int]]], combine: str = "own",
                  score: str = "max_softmax") -> list[StagePlan]:
    """One stage per ``(name, model, (height, width))``, in order of increasing cost.

    With ``combine="mean_probs"`` every stage after the first decides on the mean of its own
    and the earlier stages' probabilities, so earlier work is not wasted.
    """
    plans = []
    for k, (name, model, size) in enumerate(models):
        example = torch.zeros(1, 3, *size)
        plans.append(StagePlan(name=name, module=model.eval(), source={"source": "image", "size": list(size)},
                               has_carry=False,
                               exit={"score": score, "temperature": 1.0, "combine": combine if k else "own"},
                               macs=count_macs(model, example), params=count_params(model)))
    return plans
