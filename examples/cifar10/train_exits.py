"""Fine-tune the example CIFAR-10 ResNet together with its exit heads (exit-aware joint training).

Starts from the committed ``resnet_cifar.pt`` (``train.py``) and trains it with a conv exit head
after each of ``layer1.0``, ``layer1``, ``layer2.0`` and ``layer2`` through stagewise's own joint
trainer (:func:`stagewise.converters.torch_training.train_exits`, the code behind
``stagewise convert --train-exits joint``): every exit's loss is cross-entropy plus distillation
from the final exit's softmax, weighted by the exit's depth as in Shallow-Deep Networks.

Data: the same split as ``train.py`` (``open_image_set(...).split([0.8, 0.1, 0.1], seed=0)``):
the 40,000 train images train; the 5,000 calibration images are the held-out check printed at
the end (the original network's accuracy next to every exit's); the 5,000 test images are not
touched.

Writes ``resnet_cifar_exits.pt`` (backbone state + heads, see
:func:`~stagewise.converters.torch_training.exit_checkpoint`) and ``resnet_cifar_exits.json``
(the training record) next to this file; ``model.py:resnet_cifar_exits`` loads them. Seeded.
The committed run took 73 minutes (4,365 s) on 1 torch thread of a 2-core x86-64 machine shared
with other jobs, fp32 (this CPU has no fast bf16 kernels; with them it is about twice as fast);
see ``seconds`` in the JSON. Held-out top-1 (5,000 calibration images): exit0..exit3 57.9 / 64.4 /
76.9 / 81.3 %, final 84.52 % against 84.42 % for the original network.

    python examples/cifar10/train_exits.py
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import click
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
SPLIT = (0.8, 0.1, 0.1)
CUTS = ("layer1.0", "layer1", "layer2.0", "layer2")
#: Loss weight of each exit, growing with its depth (share of the network's MACs), as in SDN training.
EXIT_WEIGHTS = (0.3, 0.45, 0.6, 0.75)

sys.path.insert(0, str(HERE))
from model import EXIT_WEIGHTS_FILE, NUM_CLASSES, resnet_cifar  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA,
              show_default="<repo>/../shared/data/cifar10-train.tar.gz", help="CIFAR-10 training archive.")
@click.option("--epochs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--lr", type=float, default=0.02, show_default=True, help="Peak one-cycle learning rate of the backbone.")
@click.option("--head-lr", type=float, default=0.1, show_default=True, help="Peak learning rate of the new heads.")
@click.option("--head", "kind", type=click.Choice(["conv", "gap_linear", "mlp"]), default="conv", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=EXIT_WEIGHTS_FILE,
              show_default="<repo>/examples/cifar10/resnet_cifar_exits.pt")
def main(data: Path, epochs: int, lr: float, head_lr: float, kind: str, seed: int, threads: int, out: Path) -> None:
    """Joint fine-tuning of the CIFAR-10 ResNet and its exits on the train part of the split."""
    from stagewise.converters.heads import FineTuning, HeadTraining
    from stagewise.converters.torch_source import TorchSource
    from stagewise.converters.torch_training import exit_checkpoint, train_exits
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess

    if not data.exists():
        raise SystemExit(f"CIFAR-10 archive not found: {data}\nPass --data; nothing is downloaded.")
    torch.set_num_threads(threads)
    train_set, calib_set, _test = open_image_set(data).split(list(SPLIT), seed=seed)
    model = resnet_cifar()
    spec = model.stagewise_input
    preprocess = Preprocess(mean=tuple(spec["mean"]), std=tuple(spec["std"]), resize=spec["resize"],
                            crop_fraction=spec["crop_fraction"])
    training = HeadTraining(kind=kind, mode="joint", tuning=FineTuning(
        epochs=epochs, lr=lr, head_lr=head_lr, exit_weights=EXIT_WEIGHTS, seed=seed))
    segments = TorchSource().split(model, list(CUTS))
    segments, heads, record = train_exits(segments, train_set, preprocess, (32, 32), NUM_CLASSES, training,
                                          held_out=calib_set)
    record.update({"cuts": list(CUTS), "data": data.name, "split": {"fractions": list(SPLIT), "seed": seed},
                   "held_out_part": "calibration", "threads": threads, "torch_version": str(torch.__version__),
                   "cpu": platform.processor() or platform.machine(), "started_from": "resnet_cifar.pt"})
    torch.save(exit_checkpoint(segments, heads, CUTS, training, NUM_CLASSES, (32, 32), record), out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); held-out accuracy {record['held_out']}")


if __name__ == "__main__":
    main()
