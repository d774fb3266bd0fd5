"""Static costs of a torch module: multiply-accumulates and parameters."""

from __future__ import annotations

import torch


def count_macs(module: torch.nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on a single sample, counted over Conv2d and Linear layers."""
    total = 0

    def conv(m: torch.nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: torch.nn.Linear, _inp, out):
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    try:
        with torch.no_grad():
            module.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def count_params(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
