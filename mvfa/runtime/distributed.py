"""Several processes on torch.distributed (torchrun): the process group, the rank context, collectives.

Under `torchrun --nproc_per_node N` (or any launcher that sets WORLD_SIZE, RANK and LOCAL_RANK)
`process_group` starts a process group, NCCL when the rank's device is a GPU (cuda:LOCAL_RANK) and
gloo on the CPU, and yields a `Dist`: the rank, the number of ranks, and the device that tensor
collectives use. Without those variables (or with WORLD_SIZE 1) it yields `SINGLE` and starts
nothing, so a plain `python script.py` runs as one process with no group.

Library code receives a `Dist` as an argument (never reads the environment); every helper here is
a no-op for `SINGLE`. The only state is what torch.distributed itself holds.

Failure: a rank that fails prints its error and leaves with `os._exit` (`fail`), without waiting in
any collective; torchrun then stops the other ranks, and a rank already waiting for the failed one
gets a connection error from gloo (or, at the latest, the process group's timeout).
"""
from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
from datetime import timedelta
import os
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as tdist

from mvfa.runtime.errors import MVFAError

ENV_WORLD_SIZE, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"
DEFAULT_TIMEOUT_S = 600.0  # longest wait in one collective before the job fails (--dist_timeout)
MAIN_RANK = 0
GPU_BACKEND, CPU_BACKEND = "nccl", "gloo"


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the ranks of a job; `Dist()` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where tensors go for collectives: cuda:<local rank> under NCCL, cpu under gloo

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == MAIN_RANK

    def batch_shard(self, count: int, batch_size: int) -> tuple[int, int]:
        """This rank's images [start, stop) of `count` scored in batches of `batch_size`.

        Contiguous runs of whole batches (rank r gets batches r*B//W .. (r+1)*B//W - 1 of the B
        batches), no padding and no duplicates: every image is scored in the same batch, with the
        same neighbours, as in a single process, which keeps per-image values bitwise equal
        (batched matrix products may round differently for another batch composition).
        """
        batches = -(-count // batch_size) if count else 0
        first = self.rank * batches // self.world_size
        last = (self.rank + 1) * batches // self.world_size
        return min(first * batch_size, count), min(last * batch_size, count)


SINGLE = Dist()


def launched_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None outside a multi-process launch."""
    world = os.environ.get(ENV_WORLD_SIZE)
    if world is None or int(world) <= 1:
        return None
    return int(os.environ.get(ENV_RANK, "0")), int(world), int(os.environ.get(ENV_LOCAL_RANK, "0"))


def rank_device(requested: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of one rank: its own GPU (cuda:LOCAL_RANK) when CUDA is used, else the CPU."""
    if requested is not None and requested != "cuda":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise MVFAError(f"--device {requested!r} is not a device: use cpu or cuda") from None
        if device.type == "cuda":
            raise MVFAError(
                f"--device {requested} under torchrun would put all {world_size} ranks on one GPU: pass "
                "--device cuda (each rank takes cuda:LOCAL_RANK) or --device cpu"
            )
        return device
    if requested is None and not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise MVFAError(
            f"rank with LOCAL_RANK {local_rank} has no GPU ({count} visible): start at most {count} processes "
            "per node (--nproc_per_node), or pass --device cpu"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(
    requested_device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> Iterator[tuple[Dist, str | None]]:
    """Yield (Dist, device for the run); a process group lives inside under torchrun, nothing otherwise.

    Outside a multi-process launch the device is `requested_device` unchanged (the scripts resolve it). Under torchrun it is the rank's device; the backend is NCCL for GPUs and gloo for the
    CPU unless `backend` says otherwise. `timeout_s` bounds every collective, the start included.
    """
    ranks = launched_ranks()
    if ranks is None:
        yield SINGLE, requested_device
        return
    rank, world_size, local_rank = ranks
    if timeout_s <= 0:
        raise MVFAError(f"--dist_timeout {timeout_s} is invalid: give seconds > 0")
    device = rank_device(requested_device, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or (GPU_BACKEND if device.type == "cuda" else CPU_BACKEND)
    tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    comm_device = str(device) if backend == GPU_BACKEND else "cpu"
    try:
        yield Dist(rank, world_size, local_rank, comm_device), str(device)
    finally:
        tdist.destroy_process_group()


def is_secondary_rank() -> bool:
    """True in a rank other than 0 of a started process group (progress bars stay silent there)."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_rank() != MAIN_RANK


@contextlib.contextmanager
def quiet_unless_main(dist: Dist) -> Iterator[None]:
    """Standard output of ranks other than 0 is dropped (errors still go to standard error)."""
    if dist.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def fail(dist: Dist, message: str, code: int) -> NoReturn:
    """Print `message` on standard error (with the rank, on ranks other than 0) and leave now.

    os._exit does not wait in any collective nor for the process group's teardown, so the other
    ranks are released (gloo reports the closed connection; torchrun stops them) instead of hanging.
    """
    text = message.rstrip("\n")
    if not dist.is_main:
        text = f"[rank {dist.rank}] {text}"
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)
    os._exit(code)


# ------------------------------------------------------------------------------------------------
# Collectives (each returns its input's value unchanged in a single process)


def barrier(dist: Dist) -> None:
    if dist.active:
        tdist.barrier()


def broadcast_object(value, dist: Dist):
    """Rank 0's `value` on every rank."""
    if not dist.active:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=MAIN_RANK)
    return box[0]


def gather_objects(value, dist: Dist) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if not dist.active:
        return [value]
    out = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(value, out, dst=MAIN_RANK)
    return out


def _padded(tensor: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, list[int]]:
    """`tensor` on the collective device, padded along dim 0 to the longest rank's length; all lengths."""
    tensor = tensor.to(dist.device).contiguous()
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=dist.device)
    lengths = [torch.zeros_like(length) for _ in range(dist.world_size)]
    tdist.all_gather(lengths, length)
    sizes = [int(n) for n in lengths]
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = torch.zeros((longest - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        tensor = torch.cat([tensor, pad])
    return tensor, sizes


def all_gather_cat(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's tensor (lengths may differ), in rank order, on every rank (CPU)."""
    if not dist.active:
        return tensor.cpu()
    padded, sizes = _padded(tensor, dist)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded)
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def gathered_in_order(values: torch.Tensor | None, dist: Dist) -> torch.Tensor | None:
    """Every rank's per-image values, in image order, on every rank, on their device (the tensor itself
    in a single process; None stays None)."""
    if values is None or not dist.active:
        return values
    return all_gather_cat(values, dist).to(values.device)


def gather_cat(tensor: torch.Tensor, dist: Dist) -> torch.Tensor | None:
    """The same concatenation on rank 0 only (None elsewhere): for data only rank 0 needs."""
    if not dist.active:
        return tensor.cpu()
    padded, sizes = _padded(tensor, dist)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)] if dist.is_main else None
    tdist.gather(padded, parts, dst=MAIN_RANK)
    if not dist.is_main:
        return None
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def all_reduce(tensor: torch.Tensor, op: str, dist: Dist) -> torch.Tensor:
    """Elementwise "sum", "min" or "max" over the ranks, on the tensor's own device."""
    if not dist.active:
        return tensor
    ops = {"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}
    work = tensor.to(dist.device).clone()
    tdist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def broadcast_parameters(parameters: list[torch.nn.Parameter], dist: Dist) -> None:
    """Rank 0's values of `parameters`, copied into every rank's (in place)."""
    if not dist.active:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in parameters]).to(dist.device)
        tdist.broadcast(flat, src=MAIN_RANK)
        offset = 0
        for p in parameters:
            p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()


def average_gradients(
    parameters: list[torch.nn.Parameter], count: int, loss: float, has_seg: bool, dist: Dist
) -> tuple[int, float, bool]:
    """Make every rank's gradients those of the mean loss over all ranks' images; one all-reduce.

    Each rank computed the gradients of its own batch's mean loss (`count` images). The sum over
    ranks of count * gradient, divided by the total count, is the gradient of the mean over the
    concatenated batch, also when the ranks hold different numbers of images (an empty rank adds
    zeros). Missing gradients count as zero. Returns (total images, the mean loss over them,
    whether any rank's batch had a seg loss: the seg optimiser then steps on every rank).
    """
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in parameters]
    device = parameters[0].device
    head = torch.tensor([float(count), float(loss) * count, float(has_seg)], device=device)
    flat = torch.cat([head, *(g.float() * count for g in grads)])
    flat = all_reduce(flat, "sum", dist)
    total = int(flat[0].item())
    if total == 0:
        raise MVFAError("a data-parallel step got no images on any rank")
    offset = len(head)
    for p in parameters:
        p.grad = (flat[offset : offset + p.numel()] / total).view_as(p).to(p.dtype)
        offset += p.numel()
    return total, float(flat[1].item()) / total, bool(flat[2].item() > 0)


# ------------------------------------------------------------------------------------------------
# The collective operations exact pixel metrics need (mvfa.metrics.sharded_pixel_metrics), on numpy


class NumpyCollective:
    """mvfa.metrics' view of the ranks: numpy arrays in and out, tensors over the process group."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def all_gather_cat(self, array: np.ndarray) -> np.ndarray:
        return all_gather_cat(torch.from_numpy(np.ascontiguousarray(array)), self.dist).numpy()

    def gather_cat(self, array: np.ndarray) -> np.ndarray | None:
        out = gather_cat(torch.from_numpy(np.ascontiguousarray(array)), self.dist)
        return None if out is None else out.numpy()

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """Elementwise sum over the ranks of an int64 array."""
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        return all_reduce(tensor, "sum", self.dist).cpu().numpy()

    def all_min(self, value: int) -> int:
        return int(all_reduce(torch.tensor([value], dtype=torch.int64), "min", self.dist)[0])

    def all_max(self, value: int) -> int:
        return int(all_reduce(torch.tensor([value], dtype=torch.int64), "max", self.dist)[0])

    def broadcast(self, value):
        return broadcast_object(value, self.dist)
