"""Glance stages for PyTorch classifiers: logits plus the class-activation map of the top class, in one graph.

A classifier whose last block is global average pooling + linear (optionally with flatten,
reshape and dropout between them) is traced with ``torch.fx``; the feature map that enters the
pooling is the last 4-D value before the final ``Linear`` with more than one spatial cell. The
glance module returns ``(logits, cam)`` with ``cam[n] = sum_c W[top_n, c] * F[n, c]`` (the CAM
of Zhou et al. 2016 without the bias), ``top_n`` the arg-max of the logits: it is part of the
exported graph, so every runtime computes it. The tail is checked numerically: the logits must
equal ``linear(mean(F))``, else the model is refused.

The cell -> input mapping is ``exact`` (receptive-field centres, from the convolution and pooling
kernels, strides and dilations in graph order) when no layer pads and those layers account for
the grid's size, and ``proportional`` (the grid spread evenly over the input) otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from stagewise.errors import ConversionError
from stagewise.manifest import CamGrid

_PADS = (torch.nn.ZeroPad2d, torch.nn.ConstantPad2d, torch.nn.ReflectionPad2d, torch.nn.ReplicationPad2d)
_WINDOWS = (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)


_NOT_GAP = ("the glance model's last block is not global average pooling + linear (its logits are not "
            "linear(mean(features)) of its last feature map), so it has no CAM that explains them; use a model that "
            "ends in global average pooling and one linear layer")


class GlanceStage(torch.nn.Module):
    """A traced classifier returning ``(logits, cam)`` (see the module docstring)."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.graph_module(x)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pads(module: torch.nn.Module) -> bool:
    """Whether ``module`` pads its input, or may (a subclass of a window layer with its own forward)."""
    if any(isinstance(m, _PADS) for m in module.modules()):
        return True
    if isinstance(module, _WINDOWS) and type(module) not in _WINDOWS:
        return True
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):
        return padding != "valid"
    return isinstance(module, _WINDOWS) and any(_pair(padding))


def cam_grid(traced: fx.GraphModule, features: fx.Node, size: tuple[int, int]) -> CamGrid:
    """Where the cells of ``features`` (a 4-D node of ``traced``) sit on an input of ``size``."""
    grid = tuple(int(d) for d in features.meta["tensor_meta"].shape[2:])
    modules = dict(traced.named_modules())
    pads = any(n.op == "call_function" and getattr(n.target, "__name__", "") == "pad" for n in traced.graph.nodes)
    windows = []
    for node in traced.graph.nodes:
        if node is features:
            break
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is None:
            continue
        pads = pads or _pads(module)
        if isinstance(module, _WINDOWS):
            dilation = _pair(getattr(module, "dilation", 1))
            kernel = _pair(module.kernel_size)
            windows.append((tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel)), _pair(module.stride)))
    jump, field, offset, sizes = [1, 1], [1, 1], [0.5, 0.5], list(size)
    for kernel, stride in windows:
        for a in (0, 1):
            field[a] += (kernel[a] - 1) * jump[a]
            offset[a] += (kernel[a] - 1) / 2 * jump[a]
            jump[a] *= stride[a]
            sizes[a] = (sizes[a] - kernel[a]) // stride[a] + 1
    if not pads and windows and tuple(sizes) == grid:
        return CamGrid(grid, "exact", (float(jump[0]), float(jump[1])), (offset[0], offset[1]), (field[0], field[1]))
    stride = (size[0] / grid[0], size[1] / grid[1])
    return CamGrid(grid, "proportional", stride, (stride[0] / 2, stride[1] / 2))


def glance_stage(model: torch.nn.Module, size: tuple[int, int]) -> tuple[torch.nn.Module, CamGrid]:
    """``model`` returning ``(logits, cam)`` and where its CAM cells sit on an input of ``size``.

    Raises :class:`ConversionError` when the model cannot be traced or its last block is not
    global average pooling + linear.
    """
    model = model.eval()
    try:
        traced = fx.symbolic_trace(model)
        example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        ShapeProp(traced).propagate(example)
    except Exception as exc:  # tracing raises many unrelated types
        raise ConversionError(f"cannot trace the glance model with torch.fx to add its CAM output: {exc}") from exc
    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    output = nodes[-1]
    logits = output.args[0]
    linear_nodes = [n for n in nodes if n.op == "call_module" and isinstance(modules[n.target], torch.nn.Linear)]
    if not isinstance(logits, fx.Node) or not linear_nodes or linear_nodes[-1] is not logits:
        raise ConversionError("a glance stage's model must end in a torch.nn.Linear classifier (global pooling + "
                              "linear) so its CAM can be computed; use another model for the glance stage")
    linear = logits
    spatial = [n for n in nodes[:nodes.index(linear)] if _spatial(n)]
    if not spatial:
        raise ConversionError("the glance model has no feature map with more than one spatial cell before its "
                              "classifier, so it has no CAM; use a convolutional network for the glance stage")
    features = spatial[-1]
    if features.meta["tensor_meta"].shape[1] != modules[linear.target].in_features:
        raise ConversionError(_NOT_GAP)
    graph = traced.graph
    with graph.inserting_before(output):
        weight = graph.get_attr(f"{linear.target}.weight")
        top = graph.call_method("argmax", (linear, 1))
        rows = graph.call_function(torch.index_select, (weight, 0, top))
        cam = graph.call_function(torch.einsum, ("nc,nchw->nhw", rows, features))
        pooled = graph.call_method("mean", (features, (2, 3)))
        check = graph.call_function(torch.nn.functional.linear,
                                    (pooled, weight, graph.get_attr(f"{linear.target}.bias")
                                     if modules[linear.target].bias is not None else None))
    output.args = ((linear, cam, check),)
    graph.lint()
    traced.recompile()
    with torch.no_grad():
        got, _, expected = traced(example)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(got.abs().max())):
        raise ConversionError(_NOT_GAP)
    output.args = ((linear, cam),)
    graph.erase_node(check)
    graph.erase_node(pooled)
    graph.eliminate_dead_code()
    traced.recompile()
    return GlanceStage(traced).eval(), cam_grid(traced, features, size)


def _spatial(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1
