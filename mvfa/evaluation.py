"""Evaluation: a test set held as decoded tensors, the memory bank, and batched scoring.

One evaluation path serves zero-shot and few-shot, training-time selection and the test scripts:
- zero-shot: image score = sum over stages of mean patch abnormality (det tokens); with masks,
  map = sum over stages of the text-alignment maps (seg tokens);
- few-shot, with masks: map = 0.5 mm(zero-shot map) + 0.5 mm(memory map), image score = max of map;
- few-shot, no masks: score = 0.5 mm(zero-shot score) + 0.5 mm(mean of the det memory map).
mm is min-max over the whole set, as the release. Maps are held once at full size; the memory
branch keeps only its per-stage patch grids and is upsampled again when fused (bitwise the same).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.medical import ImageSet, Sample

from . import scoring
from .errors import MVFAError
from .metrics import auroc, compute_metrics, pixel_auroc
from .model import AdaptedViT

def progress(iterable, desc: str):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, pipes, tests)."""
    return tqdm(iterable, desc=desc, leave=False, disable=None)


PIXEL_LEVELS = 255  # decoded images are k / 255: kept as uint8 and divided on use (exact)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast on CUDA for fp16/bf16; nothing on CPU (fp32 there: bf16 is slow on CPUs)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


@dataclass
class PrefixCache:
    """Outputs of the frozen blocks before the first adapter stage, per batch of a fixed image set.

    They do not depend on the adapters, so one pass serves every evaluation of the set. Batches have
    the boundaries the evaluation uses (`batch_size`), so cached and plain paths compute the same.
    """

    batch_size: int
    batches: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.batches)


def prefix_bytes(model: AdaptedViT, count: int) -> int:
    """Size of a prefix cache of `count` images (fp32 stream: tokens x width per image)."""
    tokens = model.grid_size**2 + 1
    return count * tokens * model.visual.conv1.out_channels * 4


@torch.no_grad()
def compute_prefixes(model: AdaptedViT, batches, precision: str = "fp32", batch_size: int = 1) -> PrefixCache:
    """Run the frozen prefix over an iterable of image batches (already on the model's device)."""
    device = next(model.parameters()).device
    outputs = []
    for images in batches:
        with autocast_for(device, precision):
            outputs.append(model.encode_prefix(images))
    return PrefixCache(batch_size, outputs)


def _adapted_tokens(model: AdaptedViT, images: torch.Tensor | None, cache: PrefixCache | None, index: int):
    """Stage tokens of a batch: from the cached prefix when there is one, else from the images."""
    if cache is not None:
        return model.forward_from_prefix(cache.batches[index])
    return model(images)


@dataclass
class TensorSet:
    """A set of images decoded once (uint8 images, bool masks) and reused by every evaluation."""

    images: torch.Tensor  # [N, 3, S, S] uint8
    masks: torch.Tensor  # [N, S, S] bool
    labels: torch.Tensor  # [N] int64
    paths: list[str]
    prefix_cache: PrefixCache | None = None

    @classmethod
    def load(cls, samples: list[Sample], img_size: int, num_workers: int = 0, desc: str = "loading") -> "TensorSet":
        loader = DataLoader(ImageSet(samples, img_size), batch_size=16, num_workers=num_workers)
        images, masks, labels, paths = [], [], [], []
        for batch in progress(loader, desc):
            images.append((batch["image"] * PIXEL_LEVELS).round().to(torch.uint8))
            masks.append(batch["mask"][:, 0] > 0.5)
            labels.append(batch["label"])
            paths.extend(batch["path"])
        if not images:
            raise MVFAError("the evaluation set is empty")
        return cls(torch.cat(images), torch.cat(masks), torch.cat(labels).long(), paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image_batch(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        return self.images[start:stop].to(device).float() / PIXEL_LEVELS

    def cache_prefixes(self, model: AdaptedViT, batch_size: int, precision: str = "fp32") -> None:
        """Compute the frozen prefix of every evaluation batch once (see PrefixCache)."""
        if self.prefix_cache is not None and self.prefix_cache.batch_size == batch_size:
            return
        device = next(model.parameters()).device
        starts = range(0, len(self), batch_size)
        batches = (self.image_batch(start, start + batch_size, device) for start in starts)
        self.prefix_cache = compute_prefixes(model, progress(batches, "caching frozen blocks"), precision, batch_size)


@dataclass
class MemoryBank:
    """Per-stage tokens (class tokens kept, as the release) of the augmented normal support images."""

    seg: list[torch.Tensor]
    det: list[torch.Tensor]


@torch.no_grad()
def build_memory_bank(
    model: AdaptedViT, images: torch.Tensor, batch_size: int, precision: str = "fp32", cache: PrefixCache | None = None
) -> MemoryBank:
    device = next(model.parameters()).device
    seg, det = [], []
    for index, start in enumerate(range(0, images.shape[0], batch_size)):
        with autocast_for(device, precision):
            batch = None if cache is not None else images[start : start + batch_size].to(device)
            tokens = _adapted_tokens(model, batch, cache, index)
        seg.append([t.float().flatten(0, 1) for t in tokens.seg])
        det.append([t.float().flatten(0, 1) for t in tokens.det])
    return MemoryBank([torch.cat(s) for s in zip(*seg)], [torch.cat(d) for d in zip(*det)])


@dataclass
class EvalResult:
    image_scores: np.ndarray  # [N] the score image AUROC uses
    labels: np.ndarray  # [N]
    paths: list[str]
    maps: torch.Tensor | None = None  # [N, S, S] the maps pixel AUROC uses (datasets with masks)
    masks: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def selection_score(self) -> float:
        """The release's model-selection value: pAUC + AUC, or AUC alone without masks."""
        return self.metrics["image_auroc"] + self.metrics.get("pixel_auroc", 0.0)


def check_two_classes(labels: torch.Tensor, what: str) -> None:
    if labels.unique().numel() < 2:
        kind = "abnormal" if int(labels[0]) == 1 else "normal"
        raise MVFAError(f"{what} holds only {kind} images ({len(labels)}): AUROC is undefined; it needs both classes")


@torch.no_grad()
def evaluate(
    model: AdaptedViT,
    data: TensorSet,
    text_features: torch.Tensor,
    has_masks: bool,
    memory_bank: MemoryBank | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    full_metrics: bool = False,
    memory_chunk_elements: int = 1 << 24,
    desc: str = "evaluating",
) -> EvalResult:
    """Score every image of `data`; memory_bank None -> zero-shot, else few-shot (the release's fusion)."""
    device = next(model.parameters()).device
    size = model.image_size
    count = len(data)
    zero_scores = torch.empty(count, device=device)
    few_means = torch.empty(count, device=device) if memory_bank is not None and not has_masks else None
    maps = torch.empty(count, size, size, device=device) if has_masks else None
    few_min, few_max = torch.tensor(torch.inf, device=device), torch.tensor(-torch.inf, device=device)
    few_grids = [] if memory_bank is not None and has_masks else None
    cache = data.prefix_cache if data.prefix_cache is not None and data.prefix_cache.batch_size == batch_size else None
    for index, start in enumerate(progress(range(0, count, batch_size), desc)):
        stop = min(start + batch_size, count)
        with autocast_for(device, precision):
            images = None if cache is not None else data.image_batch(start, stop, device)
            tokens = _adapted_tokens(model, images, cache, index)
        tokens = tokens.patches()
        zero_scores[start:stop] = scoring.zero_shot_image_score(tokens.det, text_features)
        if has_masks:
            maps[start:stop] = scoring.zero_shot_map(tokens.seg, text_features, size)
        if memory_bank is not None:
            stage_tokens, bank = (tokens.seg, memory_bank.seg) if has_masks else (tokens.det, memory_bank.det)
            grids = scoring.memory_distance_grids(stage_tokens, bank, memory_chunk_elements)
            few_map = scoring.upsample_and_sum(grids, size)
            if has_masks:
                few_grids.append(grids)
                few_min, few_max = torch.minimum(few_min, few_map.min()), torch.maximum(few_max, few_map.max())
            else:
                few_means[start:stop] = few_map.mean(dim=(1, 2))

    labels = data.labels
    if memory_bank is None:  # the release min-max normalises the zero-shot scores and maps too
        image_scores = scoring.min_max(zero_scores)
        if has_masks:
            low, high = maps.min(), maps.max()
            maps.sub_(low).div_(high - low)
    elif has_masks:
        _fuse_in_place(maps, few_grids, few_min, few_max, size)
        image_scores = maps.flatten(1).amax(dim=1)
    else:
        image_scores = scoring.fuse(zero_scores, few_means)

    result = EvalResult(image_scores.cpu().numpy(), labels.numpy(), list(data.paths))
    if has_masks:
        result.maps, result.masks = maps, data.masks
    if full_metrics:
        result.metrics = compute_metrics(
            result.image_scores, result.labels,
            maps.cpu() if has_masks else None, data.masks if has_masks else None,
        )
    else:
        result.metrics = {"image_auroc": auroc(result.image_scores, result.labels)}
        if has_masks:
            result.metrics["pixel_auroc"] = pixel_auroc(maps.flatten(), data.masks.to(maps.device).flatten())
    return result


def _fuse_in_place(
    maps: torch.Tensor, few_grids: list[list[torch.Tensor]], few_min: torch.Tensor, few_max: torch.Tensor, size: int
) -> None:
    """maps <- 0.5 mm(maps) + 0.5 mm(memory maps), one batch of memory maps re-upsampled at a time."""
    zero_min, zero_max = maps.min(), maps.max()
    maps.sub_(zero_min).div_(zero_max - zero_min).mul_(scoring.FUSION_WEIGHT)
    start = 0
    for grids in few_grids:
        few_map = scoring.upsample_and_sum(grids, size)
        stop = start + few_map.shape[0]
        maps[start:stop] += (1 - scoring.FUSION_WEIGHT) * ((few_map - few_min) / (few_max - few_min))
        start = stop
