"""The frozen blocks' outputs of images used again and again (support, valid and test sets).

The blocks before the first adapter stage do not depend on the adapters, so one pass serves every
training step and evaluation of a fixed image set. `PrefixBudget` decides which sets get a cache.
"""
from __future__ import annotations

from dataclasses import dataclass
import os

import torch

from dataset.tensors import TensorSet

from mvfa.choices import PREFIX_CACHE_MODES
from mvfa.method.model import AdaptedViT
from mvfa.runtime.compute import autocast_for, progress
from mvfa.runtime.errors import MVFAError

CUDA_CACHE_SHARE = 0.5  # auto: prefix caches may use this share of free GPU memory
CPU_CACHE_SHARE = 0.25  # ... or of the machine's RAM


@dataclass
class PrefixCache:
    """Outputs of the frozen blocks before the first adapter stage, per batch of a fixed image set.

    Batches have the boundaries the evaluation uses (`batch_size`), so cached and plain paths compute the same.
    """

    batch_size: int
    batches: list[torch.Tensor | None]  # None: a batch another rank scores (not cached here)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.batches if b is not None)

    def batch(self, index: int) -> torch.Tensor | None:
        """Batch `index`, or None when this cache does not hold it."""
        return self.batches[index]


def prefix_bytes(model: AdaptedViT, count: int) -> int:
    """Size of a prefix cache of `count` images (fp32 stream: tokens x width per image)."""
    tokens = model.grid_size**2 + 1
    return count * tokens * model.width * 4


@torch.no_grad()
def compute_prefixes(model: AdaptedViT, batches, precision: str = "fp32", batch_size: int = 1) -> PrefixCache:
    """Run the frozen prefix over an iterable of image batches (already on the model's device)."""
    device = next(model.parameters()).device
    outputs = []
    for images in batches:
        with autocast_for(device, precision):
            outputs.append(model.encode_prefix(images))
    return PrefixCache(batch_size, outputs)


def adapted_tokens(model: AdaptedViT, images: torch.Tensor | None, prefix: torch.Tensor | None):
    """Stage tokens of a batch: from its cached prefix when there is one, else from the images."""
    if prefix is not None:
        return model.forward_from_prefix(prefix)
    return model(images)


def set_prefixes(data: TensorSet, batch_size: int) -> PrefixCache | None:
    """The prefix cache of `data` when it was computed with these evaluation batches, else None."""
    cache = data.prefix_cache
    return cache if cache is not None and cache.batch_size == batch_size else None


def cache_set_prefixes(
    data: TensorSet, model: AdaptedViT, batch_size: int, precision: str = "fp32", shard: tuple[int, int] | None = None,
) -> None:
    """Compute the frozen prefix of every evaluation batch of `data` once (kept in `data.prefix_cache`).

    shard: only the batches of images [start, stop) (this rank's, `Dist.batch_shard`).
    """
    if set_prefixes(data, batch_size) is not None:
        return
    device = next(model.parameters()).device
    first, stop = shard if shard is not None else (0, len(data))
    batches = (data.image_batch(start, start + batch_size, device) for start in range(first, stop, batch_size))
    cache = compute_prefixes(model, progress(batches, "caching frozen blocks"), precision, batch_size)
    if shard is not None:
        before, total = first // batch_size, -(-len(data) // batch_size)
        cache.batches = [None] * before + cache.batches + [None] * (total - before - len(cache.batches))
    data.prefix_cache = cache


class PrefixBudget:
    """Decides which image sets get a prefix cache: all (on), none (off), or while memory allows (auto)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in PREFIX_CACHE_MODES:
            raise MVFAError(f"--prefix_cache {mode!r} is not known: choose one of {', '.join(PREFIX_CACHE_MODES)}")
        self.mode = mode
        if device.type == "cuda":
            self.remaining = int(CUDA_CACHE_SHARE * torch.cuda.mem_get_info(device)[0])
        else:
            self.remaining = int(CPU_CACHE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def allow(self, nbytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        if nbytes > self.remaining:
            return False
        self.remaining -= nbytes
        return True
