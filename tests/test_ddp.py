"""Joint exit training on two processes (torch DDP over gloo on the CPU) against one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagewise.converters import ConversionRequest, run_job
from stagewise.converters.distributed import batch_share
from stagewise.converters.heads import FineTuning, HeadTraining
from stagewise.converters.torch_source import TorchSource
from stagewise.converters.torch_training import train_exits
from stagewise.datasets import open_image_set
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from toy_images import make_image_folder
from toy_models import ResidualNet

# Measured: the two-process weights differ from the one-process ones by at most 1.5e-8 (float32 sums
# in another order; weights up to 1.0); dropping the uneven last batch's loss weighting moves them 9.6e-7
ATOL = 1e-7
PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
# 39 images in batches of 16: the last batch (7) splits 3 + 4, so the uneven share's loss weighting counts;
# the BatchNorm layers stay frozen (eval), as the ranks would otherwise normalise with their own halves
TRAINING = HeadTraining(mode="joint", tuning=FineTuning(epochs=1, batch_size=16, augment="flip_crop", bf16=False,
                                                        freeze="layer1.bn,layer2.bn"))


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every trained parameter and buffer of the toy network's segments and heads, after one epoch."""
    torch.manual_seed(0)
    segments = TorchSource().split(ResidualNet(classes=3).eval(), ["layer1"])
    segments, heads, _ = train_exits(segments, open_image_set(folder), PRE, (16, 16), 3, TRAINING)
    return {f"{kind}{k}.{name}": value for kind, modules in (("segment", segments), ("head", heads))
            for k, module in enumerate(modules) for name, value in module.state_dict().items()}


def _rank(rank: int, port: int, folder: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        weights = trained_weights(folder)
        if rank == 0:
            torch.save(weights, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_batch_shares_split_every_batch_and_weigh_it_as_one():
    for size in (1, 5, 7, 16):
        values = torch.arange(size, dtype=torch.float64) ** 2
        for ranks in (1, 2, 3):
            shares = [batch_share(size, r, ranks) for r in range(ranks)]
            assert [i for share, factor in shares if factor for i in range(size)[share]] == list(range(size))
            # DDP averages the ranks' gradients, so the ranks' scaled means must average to the batch's mean
            assert sum(f * values[s].mean() for s, f in shares) / ranks == pytest.approx(float(values.mean()))
    assert batch_share(16, 0, 1) == (slice(0, 16), 1.0)


def test_two_gloo_processes_train_the_exits_as_one_process_does(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=13)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(free_port(), folder, out), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = trained_weights(folder)
    finally:
        torch.set_num_threads(threads)
    shared = torch.load(out, weights_only=True)
    assert shared.keys() == alone.keys()
    for name, value in alone.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=ATOL, msg=name)
    torch.manual_seed(0)
    untrained = ResidualNet(classes=3).state_dict()
    moved = max(float((alone[f"segment0.{k}"] - untrained[k]).abs().max())
                for k in ("stem.0.weight", "layer1.conv1.weight"))
    assert moved > 100 * ATOL  # the epoch trained: equal weights are not untouched ones


def test_a_torchrun_launch_of_a_conversion_that_trains_no_exits_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    job = ConversionRequest.from_options({"stages": ["a.py:f@32", "b.py:g@64"], "out": tmp_path / "c.swb",
                                          "data": tmp_path / "images"})
    with pytest.raises(ConversionError, match="without torchrun"):
        run_job(job)
    assert list(tmp_path.iterdir()) == []
