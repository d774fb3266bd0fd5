"""Joint training on several processes: torch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m stagewise.cli convert MODEL --exits ... --train-exits joint`` starts N
copies of the conversion with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. An early-exit
conversion then joins the process group (:func:`process_group`; gloo for CPU tensors, NCCL for CUDA
ones), each rank trains on ``cuda:LOCAL_RANK`` (:func:`rank_device`) on its share of every global
batch (:func:`batch_share`), DistributedDataParallel averages the gradients, and only rank 0 writes
the bundle. Without ``torchrun`` (no ``WORLD_SIZE`` above 1) nothing here does anything.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from stagewise.errors import ConversionError


def launched_ranks() -> int:
    """How many processes ``torchrun`` started for this conversion (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world() -> tuple[int, int]:
    """``(rank, size)`` of the initialised torch process group, or ``(0, 1)`` when there is none (without
    ``torchrun`` torch is not even imported: a Keras conversion has no torch)."""
    if launched_ranks() == 1:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str) -> str:
    """Where this rank trains: ``cuda:LOCAL_RANK`` for CUDA under ``torchrun``, else ``device``."""
    if launched_ranks() == 1:
        return device
    kind = device.split(":")[0]
    if kind == "mps":
        raise ConversionError("torch's distributed training does not run on Apple's MPS; launch with torchrun on "
                              "CUDA GPUs or the CPU (--device cuda or --device cpu), or without torchrun")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if kind == "cuda" else device


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Joined to the process group ``torchrun`` set up (by its environment) for the time inside, when it started
    more than one process; torch's default backends: gloo for CPU tensors, NCCL for CUDA ones."""
    if launched_ranks() == 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group()
    try:
        yield
    finally:
        dist.destroy_process_group()


def batch_share(size: int, rank: int, ranks: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of ``size`` (contiguous, sizes differing by at most one) and the
    factor its mean loss is scaled by, so that DistributedDataParallel's average of the ranks' gradients is
    the gradient of the global batch's mean loss. A rank left without rows (a last batch smaller than the
    ranks) takes the first row with factor 0: every rank must run the backward pass."""
    start, stop = rank * size // ranks, (rank + 1) * size // ranks
    if stop == start:
        return slice(0, 1), 0.0
    return slice(start, stop), (stop - start) * ranks / size
