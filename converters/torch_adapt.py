"""Torch side of :mod:`~stagewise.converters.adapt`: BatchNorm re-estimation and head fine-tuning."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from stagewise.errors import ConversionError

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if not found:
        raise ConversionError("the model has no BatchNorm layers with running statistics, so --adapt bn/head "
                              "has nothing to re-estimate; convert it without --adapt")
    return found


def reestimate_bn(model: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
    """Replace every BatchNorm's running statistics by their cumulative average over ``batches``.

    Only the BatchNorm layers run in training mode (everything else, dropout included, stays in
    eval mode); no gradients. Returns how many BatchNorm layers were re-estimated; the model is
    left in eval mode with its layers' momentum restored.
    """
    layers = _batchnorms(model)
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for _, x in batches:
                model(torch.from_numpy(x))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return len(layers)


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConversionError("head adaptation fine-tunes the model's classifier, its last nn.Linear, and this "
                              "model has none; use --adapt bn")
    return linears[-1]


def finetune_head(model: nn.Module, epochs: Sequence[Iterable[tuple[np.ndarray, np.ndarray]]], targets: np.ndarray,
                  teacher_logits: np.ndarray, adaptation) -> list[float]:
    """Fine-tune the classifier and the BatchNorm affine parameters; returns the mean loss of each epoch.

    ``epochs`` holds one iterable of ``(indices, batch)`` per epoch; the loss of a batch is
    ``(1 - distill) * CE(targets) + distill * KL(softmax(teacher_logits) || softmax(model))``.
    BatchNorm layers stay in eval mode (the re-estimated statistics are kept).
    """
    torch.manual_seed(adaptation.seed)
    params = list(_classifier(model).parameters())
    params += [p for m in _batchnorms(model) for p in (m.weight, m.bias) if p is not None]
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=adaptation.lr)
    labels = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    teacher = torch.log_softmax(torch.from_numpy(np.asarray(teacher_logits, dtype=np.float32)), dim=1)
    model.eval()
    losses = []
    try:
        for batches in epochs:
            total, count = 0.0, 0
            for idx, x in batches:
                index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
                logp = torch.log_softmax(model(torch.from_numpy(x)), dim=1)
                loss = ((1 - adaptation.distill) * nn.functional.nll_loss(logp, labels[index])
                        + adaptation.distill * nn.functional.kl_div(logp, teacher[index], reduction="batchmean",
                                                                    log_target=True))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
            losses.append(total / max(count, 1))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return losses
