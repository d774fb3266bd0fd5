"""Find where a PyTorch classifier can be cut into sequential stages, and cut it there.

The model is traced with :func:`torch.fx.symbolic_trace` (in eval mode). A submodule is a *cut
point* when its nodes are contiguous in the traced graph and the only value computed up to its
last node that is still needed afterwards is that last node, the module's output. Splitting at
cut points yields segments that each take one tensor and return one tensor.

Parameters, buffers and constants (``get_attr`` nodes) never count as crossing a cut: each
segment gets its own copy of those it uses. Batch-size queries (``t.size(0)``,
``t.shape[0]``, ``t.size()[0]``) do not count either: a later segment recomputes them as
``carry.size(0)``, which assumes, as in any per-sample classifier, that dimension 0 is the
batch dimension of every carried tensor. Everything else crossing a cut, including the model
input itself, makes the cut invalid.
"""

from __future__ import annotations

import copy
import inspect
import operator
import sys
from typing import Sequence

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from stagewise.errors import ConversionError, InvalidCutPointError

from .source import AMBIGUOUS, CutPoint
from .torch_heads import carry_layout

_SKIPPED_OPS = ("placeholder", "get_attr", "output")


def list_cut_points(model: torch.nn.Module) -> list[str]:
    """Names of submodules (as in ``model.named_modules()``) after whose output ``model`` can be cut.

    Exactly one tensor, that module's output, crosses such a cut: every value computed before it
    that is used after it is that output itself. Names are in forward (topological) order; the
    root and the module producing the final output are excluded.

    Raises :class:`ConversionError` if the model cannot be traced with ``torch.fx`` and
    :class:`InvalidCutPointError` if it does not return a single tensor.
    """
    _, _, valid, spans = _analyse(model)
    return _listed(valid, spans)


def _listed(valid: dict[str, int], spans: dict[str, list[int]]) -> list[str]:
    """The valid cuts once per crossing tensor: of a module and its last child, the outer one."""
    chosen: dict[int, str] = {}
    for name, end in valid.items():
        if end not in chosen or (spans[name][0], name.count(".")) < (spans[chosen[end]][0], chosen[end].count(".")):
            chosen[end] = name
    return [chosen[end] for end in sorted(chosen)]


def cut_candidates(model: torch.nn.Module, example: torch.Tensor) -> list[CutPoint]:
    """Every submodule output as a :class:`CutPoint` record, in graph order, valid or not.

    A module and the child that produces the same tensor (its last child) are one candidate,
    named by the outer module. The final output is not a candidate. Shapes, channels, spatial
    reduction and cumulative MACs come from one forward pass on ``example`` (a 1 x C x H x W
    batch), so no data is needed.
    """
    traced, nodes, valid, spans = _analyse(model)
    output = _output_node(traced)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    by_end: dict[int, list[str]] = {}
    for name, span in spans.items():
        if name and nodes[span[-1]] is not output:
            by_end.setdefault(span[-1], []).append(name)
    shapes, macs = _forward_record(model, example)
    larger: dict[str, tuple[int, ...]] | None = {}
    records = []
    for end in sorted(by_end):
        group = sorted(by_end[end], key=lambda n: (spans[n][0], n.count("."), order[n]))
        name = next((n for n in group if n in valid), group[0])
        shape = shapes.get(name)
        if shape is None:
            continue
        layout = carry_layout(shape, example.shape[2:]) if 1 <= len(shape) <= 3 else "flat"
        if layout in ("NCHW", "NHWC") and len(set(shape)) == 1:
            if larger == {}:
                larger = _larger_shapes(model, example)
            layout = _cube_layout(shape, None if larger is None else larger.get(name))
        if layout in ("NCHW", "NHWC"):
            spatial = shape[1] if layout == "NCHW" else shape[0]
            channels, reduction = shape[0 if layout == "NCHW" else 2], max(1, example.shape[2] // max(1, spatial))
        else:
            channels, reduction = (shape[-1] if shape else 0), None
        records.append(CutPoint(name, shape, int(channels), reduction, macs.get(name, 0), name in valid, layout))
    return records


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention`` (torch counts only the GPU kernels)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _larger_shapes(model: torch.nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]] | None:
    """Per module, its output shape for an image twice ``example``'s side (None: the model takes no other size)."""
    try:
        return _forward_record(model, torch.zeros(1, example.shape[1], *(2 * d for d in example.shape[2:])))[0]
    except Exception:  # a model fixed to one input size
        return None


def _cube_layout(shape: tuple[int, ...], larger: tuple[int, ...] | None) -> str:
    """The layout of a cube carry (C = H = W), which its shape cannot tell: ``NCHW`` when a larger image
    (``larger``: the carry's shape then) leaves its first axis alone; else :data:`AMBIGUOUS` (channels-last,
    which exit heads would pool as channels-first, or unknown)."""
    return "NCHW" if larger is not None and larger[0] == shape[0] and larger[1] != shape[1] else AMBIGUOUS


class MacCounter:
    """Multiply-accumulates of the torch operations run while it is active: convolutions, linear layers,
    matrix products and attention, whether a module or a functional call runs them (torch's
    :class:`~torch.utils.flop_counter.FlopCounterMode` on the dispatched operators, halved)."""

    def __init__(self) -> None:
        extra = {}
        cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if cpu_attention is not None:
            extra[cpu_attention] = _cpu_attention_flops
        self._mode = FlopCounterMode(display=False, custom_mapping=extra)

    def __enter__(self) -> "MacCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self._mode.get_total_flops()) // 2


def _forward_record(model: torch.nn.Module, example: torch.Tensor) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Per named module: its output shape (one sample) and the MACs computed up to its end."""
    counter = MacCounter()
    shapes: dict[str, tuple[int, ...]] = {}
    macs: dict[str, int] = {}

    def record(name: str):
        def hook(_m: torch.nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(int(d) for d in out.shape[1:])
                macs[name] = int(counter.total)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad(), counter:
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes, macs


def split_model(model: torch.nn.Module, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """Cut ``model`` after each module named in ``cuts`` and return ``len(cuts) + 1`` segments.

    Segment 0 maps the model input to the output of ``cuts[0]``; segment ``k`` maps that carried
    tensor (its input is named ``carry``) to the output of ``cuts[k]``; the last segment maps the
    last carry to the model's output, so composing the segments equals ``model(x)``. Each segment
    is an eval-mode :class:`torch.fx.GraphModule` holding copies of only the submodules and
    parameters it uses; ``model`` itself is left unchanged.

    Raises :class:`InvalidCutPointError`, naming the bad cut and listing all valid cut points,
    when a name is unknown, is not a valid cut point, or the cuts are not in strictly forward
    order; :class:`ConversionError` when the model cannot be traced with ``torch.fx``.
    """
    traced, nodes, valid, spans = _analyse(model)
    known = {name for name, _ in model.named_modules()}
    ends: list[int] = []
    for cut in cuts:
        if cut not in valid:
            problem = "is not a submodule of the model" if cut not in known else (
                "is not a valid cut point: more than one value would cross it, it does not run "
                "as one contiguous piece of forward(), or it produces the final output")
            raise InvalidCutPointError(f"cut {cut!r} {problem}. {_valid_list(_listed(valid, spans), model)}")
        if ends and valid[cut] <= ends[-1]:
            raise InvalidCutPointError(
                f"cut {cut!r} does not come after {cuts[len(ends) - 1]!r}; cuts must be in forward "
                f"order without duplicates. {_valid_list(_listed(valid, spans), model)}")
        ends.append(valid[cut])

    output = _output_node(traced)
    starts = [0] + [end + 1 for end in ends]
    carries: list[fx.Node | None] = [None] + [nodes[end] for end in ends]
    outs = [nodes[end] for end in ends] + [output]
    stops = [end + 1 for end in ends] + [len(nodes)]
    return [_segment(model, traced.graph, nodes[start:stop], carry, out)
            for start, stop, carry, out in zip(starts, stops, carries, outs)]


def _trace(model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` in eval mode, restoring each submodule's training flag afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        tracer = _tracer()
        graph = tracer.trace(model, concrete_args=_optional_arguments(model) or None)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:
        raise ConversionError(
            f"{type(model).__name__} cannot be split: the model must be fx-traceable "
            "(torch.fx.symbolic_trace; no control flow that depends on tensor values). "
            f"Tracing failed with {type(error).__name__}: {error}") from error
    finally:
        for module, training in modes.items():
            module.training = training


def _tracer() -> fx.Tracer:
    """A ``torch.fx`` tracer that keeps timm's non-traceable modules whole (leaves) and its non-traceable
    functions wrapped, as timm's own feature extraction does, when timm is loaded (e.g. EfficientViT, MobileViT)."""
    leaves: tuple[type, ...] = ()
    functions: tuple = ()
    if "timm" in sys.modules:
        try:
            from timm.models import get_notrace_functions, get_notrace_modules
        except ImportError:
            pass
        else:
            leaves = tuple(m for m in get_notrace_modules() if isinstance(m, type))
            functions = tuple(f for f in get_notrace_functions() if callable(f))

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualified_name: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualified_name)

    return Tracer(autowrap_functions=functions)


def _optional_arguments(model: torch.nn.Module) -> dict[str, object]:
    """``forward``'s parameters with defaults (e.g. ``attn_mask=None``), bound as constants for tracing."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters[1:]
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _output_node(traced: fx.GraphModule) -> fx.Node:
    """The single node whose value the traced model returns."""
    (result,) = (node.args[0] for node in traced.graph.nodes if node.op == "output")
    if not isinstance(result, fx.Node):
        raise InvalidCutPointError(
            f"the model returns a {type(result).__name__}, not a single tensor; wrap it so "
            "that forward() returns only the logits tensor")
    return result


def _analyse(model: torch.nn.Module) -> tuple[fx.GraphModule, list[fx.Node], dict[str, int], dict[str, list[int]]]:
    """Trace ``model``; return the trace, its computing nodes in order, the valid cut points
    mapped to the index of their last node (in forward order), and every module's node indices."""
    traced = _trace(model)
    output = _output_node(traced)
    nodes = [node for node in traced.graph.nodes if node.op not in _SKIPPED_OPS]
    position = {node: index for index, node in enumerate(nodes)}

    spans: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name, _ in node.meta.get("nn_module_stack", {}).values():
            spans.setdefault(name, []).append(index)

    # A value is live across every cut from where it is computed up to its last use.
    live: list[tuple[int, int, fx.Node]] = []
    for node in traced.graph.nodes:
        if node.op in ("get_attr", "output") or _is_batch_size(node):
            continue
        last_use = max((position.get(user, len(nodes)) for user in node.users), default=-1)
        live.append((position.get(node, -1), last_use, node))

    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    valid: dict[str, int] = {}
    for name in sorted(spans, key=lambda name: (spans[name][-1], order[name])):
        span = spans[name]
        end = span[-1]
        crossing = {node for start, last_use, node in live if start <= end < last_use}
        if (name and span == list(range(span[0], end + 1)) and nodes[end] is not output
                and crossing == {nodes[end]}):
            valid[name] = end
    return traced, nodes, valid, spans


#: Cut points an error message names at most (``stagewise cuts MODEL`` lists them all).
LISTED_IN_ERRORS = 20
#: Modules that return their input in eval mode: a cut after one is the cut before it.
_IDENTITIES = (torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
               torch.nn.AlphaDropout)


def shortened(names: Sequence[str], limit: int = LISTED_IN_ERRORS) -> str:
    """``names`` comma-separated, or the first ``limit`` of them and where to see all."""
    if len(names) <= limit:
        return ", ".join(names) or "none"
    return f"{', '.join(names[:limit])} (first {limit} of {len(names)}; `stagewise cuts MODEL` lists all)"


def _valid_list(valid: list[str], model: torch.nn.Module | None = None) -> str:
    """The valid cuts for an error message: without identity modules (dropout at eval) and shortened."""
    modules = dict(model.named_modules()) if model is not None else {}
    useful = [name for name in valid if not isinstance(modules.get(name), _IDENTITIES)]
    return "Valid cut points, in forward order: " + shortened(useful) + "."


def _is_batch_size(node: fx.Node) -> bool:
    """True for ``t.size(0)``, ``t.shape[0]`` and ``t.size()[0]``."""
    if node.op == "call_method" and node.target == "size":
        return (node.args[1:] == (0,) and not node.kwargs) or node.kwargs == {"dim": 0}
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        source = node.args[0]
        return isinstance(source, fx.Node) and (
            (source.op == "call_method" and source.target == "size" and len(source.args) == 1
             and not source.kwargs)
            or (source.op == "call_function" and source.target is getattr
                and source.args[1] == "shape"))
    return False


def _segment(model: torch.nn.Module, graph: fx.Graph, members: list[fx.Node],
             carry: fx.Node | None, out: fx.Node) -> fx.GraphModule:
    """Copy the nodes of ``members`` that ``out`` depends on into a new eval-mode GraphModule
    whose input is ``carry`` (or the model inputs when ``carry`` is None)."""
    inside = set(members)
    needed: set[fx.Node] = set()
    pending = [out]
    while pending:
        node = pending.pop()
        if node in inside and node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes)

    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if carry is None:
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = new_graph.node_copy(node)
    else:
        env[carry] = new_graph.placeholder("carry")

    def value(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = new_graph.get_attr(node.target)
            elif _is_batch_size(node) and carry is not None:
                env[node] = new_graph.call_method("size", (env[carry], 0))
            else:
                raise AssertionError(f"{node.name} crosses a cut that was checked to be valid")
        return env[node]

    for node in members:
        if node in needed:
            env[node] = new_graph.node_copy(node, value)
    new_graph.output(value(out))
    return copy.deepcopy(fx.GraphModule(model, new_graph)).eval()
