"""Exit-aware training in torch: heads on a frozen backbone, or the backbone fine-tuned with its exits.

The network is already split into segments at the exit cuts (:func:`.torch_cuts.split_model`);
a head of the chosen kind (:func:`.torch_heads.make_head`) is attached after every segment but
the last. For every batch the loss is (Shallow-Deep Networks / BranchyNet style; the optional
step of Savchenko's sequential analysis, "add classifiers to all branches and fine-tune")::

    CE(y, z_final) + sum_k w_k * [(1 - d) * CE(y, z_k) + d * T^2 * KL(softmax(z_final / T) || softmax(z_k / T))]

with the final exit's own softmax, detached, as each exit's teacher (labels plus teacher
softmax beat labels alone). In ``joint`` mode every unfrozen parameter trains; in ``frozen``
mode (conv/mlp heads on a fixed backbone) only the heads do and the backbone runs without
gradients in eval mode. SGD with Nesterov momentum and a one-cycle schedule; channels-last
convolutions under bfloat16 autocast when the CPU has fast bf16 kernels (weights stay float32), or
on ``tuning.device`` (:mod:`.devices`) under its mixed precision (CUDA: float16 with loss scaling).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import ProgressTask, note, progress_bar

from .devices import autocast
from .distributed import batch_share, world
from .heads import HeadTraining
from .torch_heads import carry_layout, make_head


def bf16_supported() -> bool:
    """Whether oneDNN has fast bfloat16 kernels on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def decoded_pixels(images: ImageSet, preprocess: Preprocess, size: tuple[int, int], batch: int = 512) -> np.ndarray:
    """Every image of ``images`` resized as the stage reads it, as one uint8 N x H x W x 3 array."""
    out = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
    for i in progress_bar(range(0, len(images), batch), "decoding training images"):
        stop = min(i + batch, len(images))
        out[i:stop] = preprocess.pixels([images.image(j) for j in range(i, stop)], size)
    return out


def augment(pixels: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Augmented uint8 N x H x W x 3 batch: ``flip`` mirrors half the images; ``flip_crop`` also takes
    random crops of the image zero-padded by an eighth of its size; ``none`` returns it unchanged."""
    if mode == "none":
        return pixels
    n, h, w, _ = pixels.shape
    if mode == "flip_crop":
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = F.pad(pixels, (0, 0, pw, pw, ph, ph))
        oy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
    else:
        padded, oy, ox = pixels, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None], rows, cols]


class Normalise:
    """uint8 N x H x W x 3 -> float32 ``(x - mean) / std`` in N x C x H x W (channels-last memory)."""

    def __init__(self, preprocess: Preprocess):
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 1, 1, 3)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 1, 1, 3)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        x = ((pixels.float() - mean) / std).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last)


def _frozen_modules(segments: Sequence[torch.nn.Module], prefixes: Sequence[str]) -> list[torch.nn.Module]:
    """The segments' submodules named ``prefix`` or below it, for every prefix (each must match one)."""
    found: list[torch.nn.Module] = []
    for prefix in prefixes:
        hits = [m for seg in segments for name, m in seg.named_modules()
                if name == prefix or name.startswith(prefix + ".")]
        if not hits:
            raise ConversionError(f"--freeze {prefix!r} names no module of the network; give module names as "
                                  "`stagewise cuts MODEL` lists them, comma-separated")
        found += hits
    return found


def exit_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor, weights: Sequence[float], distill: float,
              temperature: float) -> torch.Tensor:
    """The joint loss of exits ``logits[:-1]`` and the final exit ``logits[-1]`` (module docstring)."""
    final = logits[-1].float()
    loss = F.cross_entropy(final, targets)
    teacher = F.softmax(final.detach() / temperature, dim=1)
    for z, w in zip(logits[:-1], weights):
        z = z.float()
        own = F.cross_entropy(z, targets)
        kd = F.kl_div(F.log_softmax(z / temperature, dim=1), teacher, reduction="batchmean") * temperature ** 2
        loss = loss + w * ((1 - distill) * own + distill * kd)
    return loss


def _forward(segments: Sequence[torch.nn.Module], heads: Sequence[torch.nn.Module], x: torch.Tensor,
             frozen_backbone: bool) -> list[torch.Tensor]:
    """The logits of every head (one per segment but the last, or none) and the network's output."""
    outputs = []
    for k, segment in enumerate(segments):
        with torch.set_grad_enabled(not frozen_backbone and torch.is_grad_enabled()):
            x = segment(x)
        if heads and k < len(segments) - 1:
            outputs.append(heads[k](x))
    return outputs + [x]


class _Exits(torch.nn.Module):
    """The segments and their heads as one module, the logits of :func:`_forward` its output (what
    DistributedDataParallel wraps)."""

    def __init__(self, segments: Sequence[torch.nn.Module], heads: Sequence[torch.nn.Module], frozen_backbone: bool):
        super().__init__()
        self.segments, self.heads = torch.nn.ModuleList(segments), torch.nn.ModuleList(heads)
        self.frozen_backbone = frozen_backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _forward(self.segments, self.heads, x, self.frozen_backbone)


def _distributed(segments: Sequence[torch.nn.Module], heads: Sequence[torch.nn.Module], joint: bool,
                 device: str) -> torch.nn.Module:
    """The modules as one DistributedDataParallel model on ``device`` (a frozen backbone holds no trainable
    parameter, so that every one DDP syncs gets a gradient)."""
    if not joint:
        for segment in segments:
            segment.requires_grad_(False)
    index = torch.device(device).index
    return torch.nn.parallel.DistributedDataParallel(_Exits(segments, heads, not joint),
                                                     device_ids=None if index is None else [index])


@torch.no_grad()
def exit_accuracies(segments: Sequence[torch.nn.Module], heads: Sequence[torch.nn.Module], pixels: np.ndarray,
                    targets: np.ndarray, preprocess: Preprocess, batch: int = 256) -> list[float]:
    """Top-1 accuracy of every exit and the final output on uint8 NHWC ``pixels`` (eval mode, float32)."""
    normalise = Normalise(preprocess)
    for module in [*segments, *heads]:
        module.eval()
    correct = np.zeros(len(heads) + 1)
    for i in range(0, len(pixels), batch):
        outs = _forward(segments, heads, normalise(torch.from_numpy(pixels[i:i + batch])), True)
        correct += [int((o.argmax(1).numpy() == targets[i:i + batch]).sum()) for o in outs]
    return [float(c / max(1, len(pixels))) for c in correct]


def train_exits(segments: Sequence[torch.nn.Module], images: ImageSet, preprocess: Preprocess,
                size: tuple[int, int], classes: int, training: HeadTraining,
                held_out: ImageSet | None = None) -> tuple[list[torch.nn.Module], list[torch.nn.Module], dict]:
    """Train exit heads after every segment but the last (and, in ``joint`` mode, the segments).

    In an initialised torch process group (:mod:`.distributed`, ``torchrun``) the modules train as one
    DistributedDataParallel model: every rank draws the same seeded batch order and augmentation and
    trains on its share of each global batch, so SGD sees the single-process global batch's gradient
    (BatchNorm layers that train normalise with their rank's share). Returns the trained segments (copies; the given ones are not changed), the heads in eval
    mode and the training record for the manifest. With ``held_out`` images the record also
    holds every exit's accuracy on them and the original network's, so a fine-tuned final exit
    that lost accuracy shows.
    """
    tuning = training.tuning
    joint = training.mode == "joint"
    originals = list(segments)
    segments = [copy.deepcopy(s).float() for s in segments]
    torch.manual_seed(tuning.seed)
    x = torch.zeros(1, 3, *size)
    shapes = []
    with torch.no_grad():
        for segment in segments[:-1]:
            x = segment.eval()(x)
            shapes.append(tuple(x.shape[1:]))
    heads = [make_head(training.kind, s, classes, carry_layout(s, size), training.width) for s in shapes]
    weights = tuple(tuning.exit_weights or (1.0,) * len(heads))
    if len(weights) != len(heads):
        raise ConversionError(f"{len(weights)} exit loss weights for {len(heads)} exits; give one per exit")
    frozen = [] if not joint else _frozen_modules(segments, tuning.freeze.split(",") if tuning.freeze else [])
    for module in frozen:
        module.requires_grad_(False)
    backbone = [p for s in segments for p in s.parameters() if joint and p.requires_grad]
    head_params = [p for h in heads for p in h.parameters()]
    groups = [{"params": head_params, "lr": tuning.head_lr}] + ([{"params": backbone, "lr": tuning.lr}] if backbone else [])
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=tuning.weight_decay)
    steps = (len(images) + tuning.batch_size - 1) // tuning.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], epochs=tuning.epochs,
                                                    steps_per_epoch=steps, pct_start=0.15, div_factor=10.0,
                                                    final_div_factor=100.0)
    device = tuning.device
    on_cpu = device == "cpu"
    use_bf16 = on_cpu and (bf16_supported() if tuning.bf16 is None else tuning.bf16)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    targets_np = np.asarray(images.targets, dtype=np.int64)
    pixels = torch.from_numpy(decoded_pixels(images, preprocess, size))
    targets = torch.from_numpy(targets_np)
    normalise = Normalise(preprocess)
    gen = torch.Generator().manual_seed(tuning.seed)
    for module in [*segments, *heads]:
        module.to(device=device, memory_format=torch.channels_last)
    rank, ranks = world()
    model = _distributed(segments, heads, joint, device) if ranks > 1 else None
    names = [f"exit{k}" for k in range(len(heads))] + ["final"]
    note(f"training {len(heads)} {training.kind} exit head(s) "
         f"{'with the backbone (joint)' if joint else 'on the frozen backbone'}: {tuning.epochs} epochs x {steps} "
         f"steps of {tuning.batch_size} on {len(images)} images on {device}, "
         f"{'bf16 autocast' if use_bf16 else 'mixed precision' if not on_cpu else 'float32'}")
    start = time.perf_counter()
    running = [0.0] * len(names)
    with ProgressTask(tuning.epochs * steps, "exit training") as bar:
        for epoch in range(tuning.epochs):
            for s in segments:
                s.train(joint)
            for m in frozen:
                m.eval()
            for h in heads:
                h.train()
            order = torch.randperm(len(images), generator=gen)
            correct = np.zeros(len(names))
            seen = 0
            for step in range(steps):
                idx = order[step * tuning.batch_size:(step + 1) * tuning.batch_size]
                share, factor = batch_share(len(idx), rank, ranks)
                batch = normalise(augment(pixels[idx], tuning.augment, gen)[share].to(device))
                wanted = targets[idx][share].to(device)
                precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16) if on_cpu else autocast(device)
                with precision:
                    outputs = model(batch) if model is not None else _forward(segments, heads, batch, not joint)
                loss = exit_loss(outputs, wanted, weights, training.distill, training.temperature) * factor
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if factor:
                    seen += len(wanted)
                    correct += [int((o.argmax(1) == wanted).sum()) for o in outputs]
                    running = [float(c / seen) for c in correct]
                bar.advance(f"epoch {epoch + 1}/{tuning.epochs} " +
                            " ".join(f"{n} {100 * a:.1f}%" for n, a in zip(names, running)))
            if ranks > 1:  # every rank's images
                totals = torch.tensor([seen, *correct], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(totals)
                running = [float(c / totals[0]) for c in totals[1:]]
            note(f"epoch {epoch + 1}/{tuning.epochs} ({time.perf_counter() - start:.0f} s): running train top-1 " +
                 ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(names, running)))
    seconds = time.perf_counter() - start
    # back on the CPU in float32, so the exported stages do not depend on where they trained
    segments = [s.to(device="cpu", memory_format=torch.contiguous_format).float().eval() for s in segments]
    heads = [h.to(device="cpu", memory_format=torch.contiguous_format).float().eval() for h in heads]
    record: dict[str, Any] = {
        "mode": training.mode, "kind": training.kind, "epochs": tuning.epochs, "images": len(images),
        "batch_size": tuning.batch_size, "optimizer": "SGD (Nesterov, momentum 0.9), one-cycle",
        "lr": tuning.lr if joint else None, "head_lr": tuning.head_lr, "weight_decay": tuning.weight_decay,
        "exit_weights": list(weights), "freeze": tuning.freeze, "augment": tuning.augment,
        "loss": "cross_entropy+distillation from the final exit", "distill_weight": training.distill,
        "distill_temperature": training.temperature, "bf16_autocast": use_bf16, "device": device,
        "processes": ranks if ranks > 1 else None,
        "seconds": round(seconds, 1),
        "train_accuracy_augmented_last_epoch": dict(zip(names, (round(a, 4) for a in running))),
    }
    if held_out is not None:
        held_pixels = decoded_pixels(held_out, preprocess, size)
        held_targets = np.asarray(held_out.targets, dtype=np.int64)
        after = exit_accuracies(segments, heads, held_pixels, held_targets, preprocess)
        before = exit_accuracies(originals, [], held_pixels, held_targets, preprocess)[-1]
        record["held_out"] = {"images": len(held_out), "accuracy": dict(zip(names, (round(a, 4) for a in after))),
                              "original_final_accuracy": round(before, 4)}
        note(f"held-out top-1 on {len(held_out)} images: " + ", ".join(f"{n} {100 * a:.2f}%" for n, a in zip(names, after))
             + f"; the original network {100 * before:.2f}%")
    return segments, heads, {k: v for k, v in record.items() if v is not None}


def exit_checkpoint(segments: Sequence[torch.nn.Module], heads: Sequence[torch.nn.Module], cuts: Sequence[str],
                    training: HeadTraining, classes: int, size: tuple[int, int], record: dict) -> dict:
    """What :func:`attach_exits` needs to rebuild trained exits on a fresh copy of the network: the
    backbone's state_dict (the segments' parameters keep the network's own names), every head's
    kind, carry shape, layout, width and state, and the training record."""
    backbone: dict[str, torch.Tensor] = {}
    for segment in segments:
        backbone.update({k: v.detach().clone().contiguous() for k, v in segment.state_dict().items()})
    x = torch.zeros(1, 3, *size)
    exits = {}
    with torch.no_grad():
        for cut, segment, head in zip(cuts, segments, heads):
            x = segment.eval()(x)
            shape = [int(d) for d in x.shape[1:]]
            exits[cut] = {"kind": training.kind, "shape": shape, "layout": carry_layout(shape, size),
                          "width": training.width, "classes": classes,
                          "state": {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}}
    # plain JSON values only, so that torch.load(..., weights_only=True) reads the checkpoint back
    return {"backbone": backbone, "exits": exits, "training": json.loads(json.dumps(record, default=str))}


def attach_exits(model: torch.nn.Module, checkpoint: dict) -> torch.nn.Module:
    """``model`` with the backbone weights of an :func:`exit_checkpoint` and its trained heads as
    ``model.stagewise_exits`` (cut name -> head module) and the record as ``model.stagewise_training``,
    which ``stagewise convert`` uses with ``--train-exits given`` (the default for such a model)."""
    missing, unexpected = model.load_state_dict(checkpoint["backbone"], strict=False)
    if missing or unexpected:
        raise ConversionError(f"the exit checkpoint does not fit this network (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); build the network the checkpoint was trained from")
    exits = {}
    for cut, spec in checkpoint["exits"].items():
        head = make_head(spec["kind"], spec["shape"], spec["classes"], spec["layout"], spec["width"])
        head.load_state_dict(spec["state"])
        exits[cut] = head.eval()
    model.stagewise_exits = exits
    model.stagewise_training = dict(checkpoint["training"])
    return model.eval()
