"""Train the example CIFAR-10 ResNet (``model.py``) on CPU and save its weights.

Data: the CIFAR-10 training archive ``../shared/data/cifar10-train.tar.gz`` (relative to the
repository root; ``--data`` to use another). It is split with
``open_image_set(path).split([0.8, 0.1, 0.1], seed=0)`` into 40,000 train / 5,000 calibration /
5,000 test images, stratified and seeded. Only the train part is used here; the calibration
part is kept for the early-exit thresholds and the test part for reporting. The accuracy printed
at the end is measured on the test part and is never used to choose anything.

Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch 128, one-cycle learning rate,
no label smoothing, random 32x32 crops of the 4-pixel zero-padded image plus horizontal flips.
Convolutions run in channels-last layout and, when the CPU supports it, under bfloat16
autocast (about twice as fast here); the weights stay float32 and are saved as float32.

Writes ``resnet_cifar.pt`` (the state_dict) and ``resnet_cifar.json`` (what was run and the
accuracies) next to this file unless ``--out`` says otherwise. ``--widths 16,32,64 --out
examples/cifar10/resnet_cifar_small.pt`` trains the smaller static network the benchmarks compare
the early exits with (a quarter of the MACs; the committed 15 epochs took 37 min on 1 thread of a
shared 2-core CPU without bf16: 82.1 % test top-1, see its JSON).

    python examples/cifar10/train.py --epochs 15
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
SPLIT = (0.8, 0.1, 0.1)
TRAIN_EVAL_SAMPLE = 5000

sys.path.insert(0, str(HERE))
from model import MEAN, STD, WEIGHTS, ResNetCifar  # noqa: E402

console = Console(highlight=False, soft_wrap=True)


def decode_all(image_set) -> np.ndarray:  # noqa: ANN001 - stagewise.datasets.ImageSet
    """Decode every image of ``image_set`` into one Nx3x32x32 uint8 array."""
    out = np.empty((len(image_set), 3, 32, 32), dtype=np.uint8)
    for i in range(len(image_set)):
        img = image_set.image(i)
        if img.shape != (32, 32, 3):
            raise SystemExit(f"image {i} of {image_set.origin} has shape {img.shape}; expected 32x32x3")
        out[i] = img.transpose(2, 0, 1)
    return out


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x - MEAN) / STD`` in channels-last memory layout."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(padded: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of a zero-padded Bx3x40x40 uint8 batch, each flipped with p=0.5."""
    b = padded.shape[0]
    oy = torch.randint(0, 9, (b,), generator=gen)
    ox = torch.randint(0, 9, (b,), generator=gen)
    ar = torch.arange(32)
    rows = (oy[:, None] + ar)[:, None, :, None]
    cols = (ox[:, None] + ar)[:, None, None, :]
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode, float32) on uint8 NCHW ``images``."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x = normalise(torch.from_numpy(images[start:start + batch]))
        pred = model(x).argmax(1).numpy()
        correct += int((pred == labels[start:start + batch]).sum())
    return correct / len(images)


def bf16_supported() -> bool:
    """Whether oneDNN has fast bfloat16 kernels on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA,
              show_default="<repo>/../shared/data/cifar10-train.tar.gz",
              help="CIFAR-10 training archive (or folder of class folders).")
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", "max_lr", type=float, default=0.1, show_default=True, help="Peak one-cycle learning rate.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of training.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True,
              help="torch threads; on a CPU busy with other work 1 can be much faster than 2.")
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast for training [default: if the CPU supports it].")
@click.option("--widths", default="32,64,128", show_default=True,
              help="channels of layer1,layer2,layer3 (16,32,64 is the smaller static network of the benchmarks)")
@click.option("--out", type=click.Path(path_type=Path), default=WEIGHTS,
              show_default="<repo>/examples/cifar10/resnet_cifar.pt",
              help="Where to write the state_dict; the JSON summary goes next to it (.json).")
def main(data: Path, epochs: int, batch_size: int, max_lr: float, weight_decay: float, seed: int,
         threads: int, bf16: bool | None, widths: str, out: Path) -> None:
    """Train the CIFAR-10 example ResNet on the 40,000-image train part of the split."""
    from stagewise.datasets import open_image_set

    if not data.exists():
        raise SystemExit(
            f"CIFAR-10 archive not found: {data}\n"
            "Expected the shared data at ../shared/data/cifar10-train.tar.gz (relative to the repository "
            "root) or a path given with --data. Nothing is downloaded.")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    use_bf16 = bf16_supported() if bf16 is None else bf16

    t0 = time.time()
    image_set = open_image_set(data)
    train_set, calib_set, test_set = image_set.split(list(SPLIT), seed=seed)
    train_x = decode_all(train_set)
    train_y = train_set.targets.astype(np.int64)
    console.print(f"data: {len(image_set)} images, {len(image_set.classes)} classes; split train "
                  f"{len(train_set)} / calibration {len(calib_set)} / test {len(test_set)} (seed {seed}); "
                  f"decoded train in {time.time() - t0:.1f} s")

    padded = F.pad(torch.from_numpy(train_x), (4, 4, 4, 4))  # zero (black) padding, uint8
    labels = torch.from_numpy(train_y)
    n = len(train_x)
    steps_per_epoch = (n + batch_size - 1) // batch_size

    width_triple = tuple(int(w) for w in widths.split(","))
    model = ResNetCifar(widths=width_triple).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25,
        div_factor=10.0, final_div_factor=100.0)
    gen = torch.Generator().manual_seed(seed)
    console.print(f"training {epochs} epochs x {steps_per_epoch} steps, batch {batch_size}, peak lr {max_lr}, "
                  f"{threads} threads, bf16 autocast {'on' if use_bf16 else 'off'}, channels_last")

    start = time.time()
    epoch_seconds: list[float] = []
    train_acc_aug = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        te = time.time()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = normalise(augment(padded[idx], gen))
            y = labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        epoch_seconds.append(time.time() - te)
        train_acc_aug = correct / n
        console.print(f"epoch {epoch:3d}/{epochs}  loss {loss_sum / n:.4f}  train acc (augmented) "
                      f"{train_acc_aug:.4f}  lr {scheduler.get_last_lr()[0]:.4f}  {epoch_seconds[-1]:.0f} s  "
                      f"(total {time.time() - start:.0f} s)")
    train_seconds = time.time() - start

    model = model.to(memory_format=torch.contiguous_format).float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out)

    # Clean (un-augmented) accuracy on a fixed sample of the train part: enough to see the fit.
    sample = np.random.default_rng(seed).choice(n, size=min(n, TRAIN_EVAL_SAMPLE), replace=False)
    train_acc = accuracy(model, train_x[sample], train_y[sample])
    test_x = decode_all(test_set)
    test_y = test_set.targets.astype(np.int64)
    test_acc = accuracy(model, test_x, test_y)
    summary = {
        "model": "examples/cifar10/model.py:resnet_cifar" + ("" if width_triple == (32, 64, 128) else "_small"),
        "widths": list(width_triple),
        "data": data.name,
        "split": {"fractions": list(SPLIT), "seed": seed, "train": len(train_set),
                  "calibration": len(calib_set), "test": len(test_set)},
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": {"name": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": weight_decay,
                      "schedule": "OneCycleLR", "max_lr": max_lr, "pct_start": 0.25},
        "label_smoothing": 0.0,
        "augmentation": "random crop 32 from 4-px zero padding + horizontal flip",
        "bf16_autocast": use_bf16,
        "threads": threads,
        "seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / epochs, 1),
        "train_accuracy": round(train_acc, 4),
        "train_accuracy_images": len(sample),
        "train_accuracy_augmented_last_epoch": round(train_acc_aug, 4),
        "test_accuracy": round(test_acc, 4),
        "test_images": len(test_set),
        "torch_version": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    size_mb = out.stat().st_size / 1e6
    console.print(f"saved {out} ({size_mb:.2f} MB) and {json_path.name}")
    console.print(f"train accuracy {train_acc:.4f} on {len(sample)} train images (no augmentation); "
                  f"test accuracy {test_acc:.4f} on {len(test_set)} held-out images")


if __name__ == "__main__":
    main()
