"""PyTorch early exit: cut a network at named modules and attach a trained exit head to each cut.

Stage k (k < last) maps its input (the image for stage 0, the previous carry otherwise) to
``(carry, logits)``; the last stage maps the last carry to the network's own logits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from stagewise.datasets import ImageSet
from stagewise.images import Preprocess
from stagewise.progress import progress_bar

from .build import StagePlan
from .costs import count_macs, count_params
from .heads import HeadTraining, pooled, train_head
from .torch_cuts import split_model


class ExitStage(torch.nn.Module):
    """A backbone segment followed by an exit head: returns ``(carry, logits)``."""

    def __init__(self, segment: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.segment = segment
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        carry = self.segment(x)
        return carry, self.head(carry)


def _features(segments: Sequence[torch.nn.Module], preprocess: Preprocess, size: tuple[int, int],
              images: ImageSet, batch: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled carry features at every cut and the final logits, for every image."""
    feats: list[list[torch.Tensor]] = [[] for _ in segments[:-1]]
    logits = []
    with torch.no_grad():
        for i in progress_bar(range(0, len(images), batch), "backbone features for exit heads"):
            chunk = [images.image(j) for j in range(i, min(i + batch, len(images)))]
            x = torch.from_numpy(preprocess.tensor(chunk, size))
            for k, seg in enumerate(segments):
                x = seg(x)
                if k < len(segments) - 1:
                    feats[k].append(pooled(x))
            logits.append(x)
    return [torch.cat(f) for f in feats], torch.cat(logits)


def early_exit_plans(model: torch.nn.Module, cuts: Sequence[str], preprocess: Preprocess, size: tuple[int, int],
                     head_images: ImageSet, training: HeadTraining = HeadTraining(),
                     score: str = "max_softmax") -> list[StagePlan]:
    """Stages of ``model`` cut after ``cuts``, each non-final one with a GAP+linear exit head.

    Heads are trained on ``head_images`` with the backbone frozen (labels plus distillation from
    the network's own final softmax).
    """
    model = model.eval()
    segments = split_model(model, cuts)
    feats, teacher = _features(segments, preprocess, size, head_images)
    labels = torch.from_numpy(np.asarray(head_images.labels))
    names = [f"exit{k}" for k in range(len(cuts))] + ["final"]
    example = torch.from_numpy(preprocess.tensor([head_images.image(0)], size))
    plans = []
    x = example
    for k, segment in enumerate(segments):
        last = k == len(segments) - 1
        if last:
            module, head_record = segment, None
        else:
            head, head_record = train_head(feats[k], labels, teacher, training)
            head_record["after"] = cuts[k]
            module = ExitStage(segment, head).eval()
        source = {"source": "image", "size": list(size)} if k == 0 else {"source": "carry", "from": names[k - 1]}
        plans.append(StagePlan(name=names[k], module=module, source=source, has_carry=not last,
                               exit={"score": score, "temperature": 1.0, "combine": "own"},
                               macs=count_macs(module, x), params=count_params(module), head=head_record))
        with torch.no_grad():
            out = module(x)
        x = out if last else out[0]
    return plans
