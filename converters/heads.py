"""Exit heads (global average pooling + linear) trained on a frozen backbone.

Loss: ``(1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || head_T)`` where the
teacher is the full model's own classifier (labels plus teacher softmax beat labels alone).
Because the backbone is frozen and the head starts with pooling, the head is trained on the
pooled features directly; features are standardised for the optimiser and the scaling is
folded back into the linear layer, so the exported head is plain ``pool -> flatten -> linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadTraining:
    """Settings of exit-head training."""

    distill: float = 0.5
    temperature: float = 2.0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def gap_linear_head(channels: int, classes: int) -> torch.nn.Sequential:
    """``AdaptiveAvgPool2d(1) -> Flatten -> Linear``: the default exit head."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, classes))


def pooled(carry: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled features (N x C) of an N x C x H x W carry tensor."""
    return carry.mean(dim=(2, 3)) if carry.dim() == 4 else carry.flatten(1)


def train_head(features: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
               settings: HeadTraining = HeadTraining()) -> tuple[torch.nn.Sequential, dict]:
    """Train a GAP+linear head on pooled ``features``; returns the head and a training record."""
    gen = torch.Generator().manual_seed(settings.seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    classes = teacher_logits.shape[1]
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(linear.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(x) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps)
    soft = F.softmax(teacher_logits / settings.temperature, dim=1)
    t2 = settings.temperature ** 2
    for _ in range(settings.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size):
            out = linear(x[idx])
            loss = (1 - settings.distill) * F.cross_entropy(out, labels[idx])
            if settings.distill:
                log_p = F.log_softmax(out / settings.temperature, dim=1)
                loss = loss + settings.distill * t2 * F.kl_div(log_p, soft[idx], reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head = gap_linear_head(x.shape[1], classes)
    with torch.no_grad():
        head[2].weight.copy_(linear.weight / std)
        head[2].bias.copy_(linear.bias - (linear.weight * (mean / std)).sum(1))
        train_acc = float((head[2](features).argmax(1) == labels).float().mean())
    record = {"kind": "gap_linear", "trained_on": "frozen backbone", "loss": "cross_entropy+distillation",
              "distill_weight": settings.distill, "distill_temperature": settings.temperature,
              "epochs": settings.epochs, "images": int(len(x)), "train_accuracy": train_acc}
    return head, record
