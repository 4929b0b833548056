"""Evaluation: a test set held as decoded tensors, the memory bank, and batched scoring.

One evaluation path serves zero-shot and few-shot, training-time selection and the test scripts:
- zero-shot: image score = sum over stages of mean patch abnormality (det tokens); with masks,
  map = sum over stages of the text-alignment maps (seg tokens);
- few-shot, with masks: map = 0.5 mm(zero-shot map) + 0.5 mm(memory map), image score = max of map;
- few-shot, no masks: score = 0.5 mm(zero-shot score) + 0.5 mm(mean of the det memory map).
mm is min-max over the whole set, as the release. Maps are held once at full size; the memory
branch keeps only its per-stage patch grids and is upsampled again when fused (bitwise the same).

A fixed `Normalization` (per-branch low/high fitted once, e.g. on valid normal images, by
`fit_normalization`) replaces the set-wide min-max when given to `evaluate`: every image's score
then depends only on that image (and the support), so one image can be scored alone (mvfa.predict).

Several processes (a `Dist` with more than one rank): each rank scores a contiguous run of whole
evaluation batches (`Dist.batch_shard`: no padding, no duplicates, each image in the same batch as
in one process), the set-wide minima and maxima are reduced over the ranks, the per-image values
are gathered in image order on every rank, and the pixel metrics merge exact counts
(mvfa.metrics.sharded_pixel_metrics). Image scores, predictions and metrics equal a single
process's to the last digit; maps stay with the rank that computed them (`EvalResult.map_range`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.medical import ImageSet, Sample

from . import scoring
from .distributed import SINGLE, Dist, NumpyCollective, all_gather_cat, all_reduce, is_secondary_rank
from .errors import MVFAError
from .files import load_torch_data, save_torch_atomic
from .metrics import auroc, compute_metrics, pixel_auroc, sharded_pixel_metrics
from .model import AdaptedViT


def progress(iterable, desc: str):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, pipes, tests) and on ranks other than 0."""
    return tqdm(iterable, desc=desc, leave=False, disable=True if is_secondary_rank() else None)


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
    batches: list[torch.Tensor | None]  # None: a batch another rank scores (not cached here)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.batches if b is not None)


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


def _adapted_tokens(model: AdaptedViT, images: torch.Tensor | None, cache: PrefixCache | None, index: int):
    """Stage tokens of a batch: from the cached prefix when there is one, else from the images."""
    if cache is not None:
        return model.forward_from_prefix(cache.batches[index])
    return model(images)


def _cached(cache: PrefixCache | None, index: int) -> PrefixCache | None:
    """`cache` when it holds batch `index`, else None."""
    return cache if cache is not None and cache.batches[index] is not None else None


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

    def subset(self, indices) -> "TensorSet":
        """The images at `indices` (in that order), without a prefix cache."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorSet(self.images[index], self.masks[index], self.labels[index], [self.paths[i] for i in index.tolist()])

    def image_batch(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        return self.images[start:stop].to(device).float() / PIXEL_LEVELS

    def cache_prefixes(
        self, model: AdaptedViT, batch_size: int, precision: str = "fp32", shard: tuple[int, int] | None = None
    ) -> None:
        """Compute the frozen prefix of every evaluation batch once (see PrefixCache).

        shard: only the batches of images [start, stop) (this rank's, `Dist.batch_shard`).
        """
        if self.prefix_cache is not None and self.prefix_cache.batch_size == batch_size:
            return
        device = next(model.parameters()).device
        first, stop = shard if shard is not None else (0, len(self))
        starts = range(first, stop, batch_size)
        batches = (self.image_batch(start, start + batch_size, device) for start in starts)
        cache = compute_prefixes(model, progress(batches, "caching frozen blocks"), precision, batch_size)
        if shard is not None:
            before, total = first // batch_size, -(-len(self) // batch_size)
            cache.batches = [None] * before + cache.batches + [None] * (total - before - len(cache.batches))
        self.prefix_cache = cache


BANK_BRANCHES = ("seg", "det")
BANK_FILE_FORMAT = "mvfa-memory-bank/1"


def bank_branch(has_masks: bool) -> str:
    """The tokens the memory map of a dataset reads: seg with pixel masks, det without."""
    return "seg" if has_masks else "det"


@dataclass
class MemoryBank:
    """Per-stage tokens (class tokens kept, as the release) of the augmented normal support images,
    stored as unit vectors (`scoring.normalize_bank`): every search then uses them as they are,
    instead of normalising the whole bank again for each evaluation batch.

    A branch that was not built (`build_memory_bank(..., branches=...)`) is None; `stages` of it
    raises MVFAError.
    """

    seg: list[torch.Tensor] | None
    det: list[torch.Tensor] | None

    def stages(self, branch: str) -> list[torch.Tensor]:
        """The per-stage bank of `branch` ("seg" or "det")."""
        if branch not in BANK_BRANCHES:
            raise ValueError(f"memory bank branch {branch!r}: use one of {', '.join(BANK_BRANCHES)}")
        stages = getattr(self, branch)
        if stages is None:
            built = [b for b in BANK_BRANCHES if getattr(self, b) is not None]
            raise MVFAError(
                f"the memory bank holds no {branch} tokens (it was built for {', '.join(built) or 'no branch'}): "
                f"scoring {'with' if branch == 'seg' else 'without'} masks needs a bank built with branches=({branch!r},)"
            )
        return stages


@torch.no_grad()
def build_memory_bank(
    model: AdaptedViT, images: torch.Tensor, batch_size: int, precision: str = "fp32", cache: PrefixCache | None = None,
    branches: tuple[str, ...] = BANK_BRANCHES,
) -> MemoryBank:
    """The memory bank of `images` (augmented normal support images), for the token `branches` asked for.

    A dataset's scoring reads one branch (`bank_branch(has_masks)`); building only that one halves
    the bank. Each stage's tokens go straight into one preallocated fp32 tensor (images x tokens per
    image rows), normalised in place: no per-batch copies and no concatenation.
    """
    unknown = [b for b in branches if b not in BANK_BRANCHES]
    if unknown or not branches:
        raise ValueError(f"memory bank branches {branches!r}: use one or both of {', '.join(BANK_BRANCHES)}")
    device = next(model.parameters()).device
    count = images.shape[0]
    per_image = model.grid_size**2 + 1  # tokens of an image, class token included
    width = model.embed_dim
    banks = {b: [torch.empty(count * per_image, width, device=device) for _ in model.stages] for b in branches}
    for index, start in enumerate(range(0, count, batch_size)):
        stop = min(start + batch_size, count)
        with autocast_for(device, precision):
            batch = None if cache is not None else images[start:stop].to(device)
            tokens = _adapted_tokens(model, batch, cache, index)
        for branch, stages in banks.items():
            for bank, stage_tokens in zip(stages, getattr(tokens, branch), strict=True):
                bank[start * per_image : stop * per_image].copy_(stage_tokens.flatten(0, 1))  # fp16 -> fp32 as .float()
        del tokens
    for stages in banks.values():
        for bank in stages:
            scoring.normalize_bank_(bank)
    return MemoryBank(banks.get("seg"), banks.get("det"))


def _short(value):
    """A fingerprint's first 12 characters, other values as they are (for one-line errors)."""
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else value


def save_memory_bank(bank: MemoryBank, branch: str, identity: dict, path: str | Path) -> None:
    """Write one branch of a memory bank, with the `identity` it was computed under (weights
    fingerprint, sizes, precision: plain data), whole or not at all."""
    state = {"format": BANK_FILE_FORMAT, "identity": identity, "branch": branch,
             "stages": [t.detach().cpu() for t in bank.stages(branch)]}
    save_torch_atomic(state, path)


def check_bank_file(path: str | Path, flag: str = "--bank") -> Path:
    """`path` as a Path when it is a file; else the one-line error that says how to write one."""
    path = Path(path)
    if not path.is_file():
        raise MVFAError(f"{flag} {path} not found: write one with --support FOLDER --save_bank {path}")
    return path


def read_memory_bank(path: str | Path, identity: dict, device: torch.device, flag: str = "--bank") -> MemoryBank:
    """A bank written by `save_memory_bank`, checked against the `identity` of the model that will use
    it: a bank of other weights, sizes or precision would give other scores, so it is an error."""
    path = check_bank_file(path, flag)
    state = load_torch_data(path, "memory bank", MVFAError, shown=f"{flag} {path}")
    if not isinstance(state, dict) or state.get("format") != BANK_FILE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise MVFAError(f"{flag} {path} is not a memory bank file (format {found!r}, expected {BANK_FILE_FORMAT!r})")
    stored = state.get("identity", {})
    for key, value in identity.items():
        if stored.get(key) != value:
            raise MVFAError(
                f"{flag} {path} does not match this run: its {key} is {_short(stored.get(key))}, this run's "
                f"{_short(value)}; rebuild it with --support FOLDER --save_bank"
            )
    stages = [t.to(device) for t in state["stages"]]
    return MemoryBank(**{b: (stages if b == state["branch"] else None) for b in BANK_BRANCHES})


# ------------------------------------------------------------------------------------------------
# Normalisation of the branches


@dataclass(frozen=True)
class Normalization:
    """Fixed min-max statistics of each scoring branch (plain floats, so checkpoints keep them as data).

    Each branch value v becomes (v - low) / (high - low) (or v - low when high == low). Branches:
    - zero_score: the zero-shot image score (det tokens); zero-shot scores, few-shot without masks;
    - zero_map: the zero-shot map's pixels (seg tokens; datasets with masks);
    - few_map: the memory map's pixels (seg tokens; few-shot, datasets with masks);
    - few_score: the memory map's image mean (det tokens; few-shot, datasets without masks).
    Fitted on normal images (`fit_normalization`), normal images then score about 0..1 and
    anomalies above. `count` and `source` say what the statistics were fitted on.
    """

    zero_score_low: float
    zero_score_high: float
    zero_map_low: float | None = None
    zero_map_high: float | None = None
    few_map_low: float | None = None
    few_map_high: float | None = None
    few_score_low: float | None = None
    few_score_high: float | None = None
    count: int = 0
    source: str = ""

    BRANCHES = ("zero_score", "zero_map", "few_map", "few_score")

    @classmethod
    def identity(cls, source: str = "none: raw branch values") -> "Normalization":
        """Low 0 and high 1 everywhere: the raw branch values (used when no statistics exist)."""
        return cls(0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0, source)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "normalization") -> "Normalization":
        """Read `to_dict`'s output back; a malformed entry raises MVFAError naming `where`."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or "zero_score_low" not in data or set(data) - names:
            raise MVFAError(f"{where} is malformed (expected the keys {', '.join(sorted(names))})")
        values = {}
        for key, value in data.items():
            if key == "source":
                values[key] = str(value)
            elif key == "count":
                values[key] = int(value)
            elif value is None:
                values[key] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[key] = float(value)
            else:
                raise MVFAError(f"{where}: {key} is {value!r}, not a finite number")
        return cls(**values)

    def bounds(self, branch: str) -> tuple[float, float] | None:
        low, high = getattr(self, f"{branch}_low"), getattr(self, f"{branch}_high")
        return None if low is None or high is None else (low, high)

    @staticmethod
    def needed(few_shot: bool, has_masks: bool) -> tuple[str, ...]:
        """The branches a scoring mode uses."""
        if not few_shot:
            return ("zero_score", "zero_map") if has_masks else ("zero_score",)
        return ("zero_map", "few_map") if has_masks else ("zero_score", "few_score")

    def missing(self, few_shot: bool, has_masks: bool) -> list[str]:
        return [b for b in self.needed(few_shot, has_masks) if self.bounds(b) is None]


def _affine(values: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return scoring.rescale_(values.clone(), *bounds)


class _MinMax:
    """Running min and max of several branches over batches."""

    def __init__(self) -> None:
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def update(self, branch: str, values: torch.Tensor) -> None:
        low, high = float(values.min()), float(values.max())
        self.low[branch] = min(low, self.low.get(branch, math.inf))
        self.high[branch] = max(high, self.high.get(branch, -math.inf))

    def reduce(self, branches: list[str], dist: Dist) -> None:
        """The minima and maxima of `branches` over all ranks (a rank without images holds none)."""
        lows = torch.tensor([self.low.get(b, math.inf) for b in branches], dtype=torch.float64)
        highs = torch.tensor([self.high.get(b, -math.inf) for b in branches], dtype=torch.float64)
        both = all_reduce(torch.cat([lows, -highs]), "min", dist)
        for i, branch in enumerate(branches):
            self.low[branch], self.high[branch] = float(both[i]), -float(both[len(branches) + i])

    def result(self, count: int, source: str) -> Normalization:
        out = {}
        for branch in Normalization.BRANCHES:
            out[f"{branch}_low"] = self.low.get(branch)
            out[f"{branch}_high"] = self.high.get(branch)
        return Normalization(**out, count=count, source=source)


# ------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class EvalResult:
    image_scores: np.ndarray  # [N] the score image AUROC uses
    labels: np.ndarray  # [N]
    paths: list[str]
    maps: torch.Tensor | None = None  # [N, S, S] the maps pixel AUROC uses (datasets with masks), or kept maps
    masks: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    normalization: Normalization | None = None  # the statistics used (the set's own min-max by default)
    fixed_scores: np.ndarray | None = None  # image scores under `score_under`, when asked
    map_range: tuple[int, int] | None = None  # the images [start, stop) whose maps (and masks) this rank holds

    @property
    def selection_score(self) -> float:
        """The release's model-selection value: pAUC + AUC, or AUC alone without masks."""
        return self.metrics["image_auroc"] + self.metrics.get("pixel_auroc", 0.0)


def check_two_classes(labels: torch.Tensor, what: str) -> None:
    if labels.unique().numel() < 2:
        kind = "abnormal" if int(labels[0]) == 1 else "normal"
        raise MVFAError(f"{what} holds only {kind} images ({len(labels)}): AUROC is undefined; it needs both classes")


@dataclass
class _Branches:
    """Raw branch values of one batch (images start..stop of the set)."""

    start: int
    stop: int
    zero_score: torch.Tensor  # [b] zero-shot image score (det)
    zero_map: torch.Tensor | None  # [b, S, S] zero-shot map: seg with masks, det when asked for without
    few_grids: list[torch.Tensor] | None  # memory distance grids per stage (few-shot)
    few_map: torch.Tensor | None  # [b, S, S] memory map (few-shot)
    few_mean: torch.Tensor | None  # [b] memory map's mean (few-shot, datasets without masks)


@torch.no_grad()
def _branches(
    model: AdaptedViT, data: TensorSet, text_features: torch.Tensor, has_masks: bool, memory_bank: MemoryBank | None,
    batch_size: int, precision: str, memory_chunk_elements: int, desc: str, det_maps: bool = False,
    shard: tuple[int, int] | None = None, release_dtypes: bool = False,
):
    """Yield the raw branches batch by batch (the one forward pass every scoring path shares).

    shard: only the batches of images [start, stop), start a multiple of batch_size.
    release_dtypes: score inside the forward's autocast, as the release does on CUDA (fp16 patch-text
    products, bank similarities and upsampling); otherwise the scoring runs in fp32 after it. On the
    CPU there is no autocast and both are the same fp32 computation.
    """
    device = next(model.parameters()).device
    size = model.image_size
    count = len(data)
    first, last = shard if shard is not None else (0, count)
    cache = data.prefix_cache if data.prefix_cache is not None and data.prefix_cache.batch_size == batch_size else None
    for start in progress(range(first, last, batch_size), desc):
        stop = min(start + batch_size, count)
        batch_cache = _cached(cache, start // batch_size)
        with autocast_for(device, precision):
            images = None if batch_cache is not None else data.image_batch(start, stop, device)
            tokens = _adapted_tokens(model, images, batch_cache, start // batch_size)
        with autocast_for(device, precision) if release_dtypes else contextlib.nullcontext():
            branches = _score_branches(tokens.patches(), text_features, has_masks, memory_bank, memory_chunk_elements,
                                       size, det_maps)
        yield _Branches(start, stop, *branches)
        del tokens, branches  # not alive during the next batch's forward (4 stages x seg and det x the batch's tokens)


def _score_branches(
    tokens, text_features: torch.Tensor, has_masks: bool, memory_bank: MemoryBank | None, memory_chunk_elements: int,
    size: int, det_maps: bool,
) -> tuple:
    """(zero score, zero map, few grids, few map, few mean) of a batch's patch tokens."""
    zero_score = scoring.zero_shot_image_score(tokens.det, text_features)
    zero_map = None
    if has_masks:
        zero_map = scoring.zero_shot_map(tokens.seg, text_features, size)
    elif det_maps:
        zero_map = scoring.zero_shot_map(tokens.det, text_features, size)
    few_grids = few_map = few_mean = None
    if memory_bank is not None:
        branch = bank_branch(has_masks)
        few_grids = scoring.memory_distance_grids(
            getattr(tokens, branch), memory_bank.stages(branch), memory_chunk_elements, normalized=True
        )
        few_map = scoring.upsample_and_sum(few_grids, size)
        if not has_masks:
            few_mean = few_map.mean(dim=(1, 2))
    return zero_score, zero_map, few_grids, few_map, few_mean




def _fixed_batch(
    batch: _Branches, norm: Normalization, has_masks: bool, few_shot: bool, want_map: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image scores, map or None) of one batch under fixed statistics."""
    weight = scoring.FUSION_WEIGHT
    if not few_shot:
        score = _affine(batch.zero_score, norm.bounds("zero_score"))
        if has_masks:
            return score, _affine(batch.zero_map, norm.bounds("zero_map"))
        return score, (_affine(batch.zero_map, norm.bounds("zero_score")) if want_map else None)
    if has_masks:
        fused = weight * _affine(batch.zero_map, norm.bounds("zero_map")) + (1 - weight) * _affine(
            batch.few_map, norm.bounds("few_map")
        )
        return fused.flatten(1).amax(dim=1), fused
    score = weight * _affine(batch.zero_score, norm.bounds("zero_score")) + (1 - weight) * _affine(
        batch.few_mean, norm.bounds("few_score")
    )
    if not want_map:
        return score, None
    fused = weight * _affine(batch.zero_map, norm.bounds("zero_score")) + (1 - weight) * _affine(
        batch.few_map, norm.bounds("few_score")
    )
    return score, fused


def _check_covers(norm: Normalization, few_shot: bool, has_masks: bool, what: str) -> None:
    missing = norm.missing(few_shot, has_masks)
    if missing:
        mode = "few-shot" if few_shot else "zero-shot"
        raise MVFAError(
            f"{what} ({norm.source or 'no source'}) lack the {', '.join(missing)} branch statistics that "
            f"{mode} scoring {'with' if has_masks else 'without'} masks needs"
        )


@torch.no_grad()
def fit_normalization(
    model: AdaptedViT,
    data: TensorSet,
    text_features: torch.Tensor,
    has_masks: bool,
    memory_bank: MemoryBank | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    source: str = "",
    memory_chunk_elements: int = 1 << 24,
    dist: Dist = SINGLE,
    release_dtypes: bool = False,
) -> Normalization:
    """Min and max of every branch over `data` (meant for normal images not in the support).

    The zero-shot branches are always fitted; the memory branch when a memory bank is given.
    Training (calibration), the test scripts' --normalize valid and so predict use this one function.
    With several ranks each scores its shard and the minima and maxima are reduced over the ranks.
    """
    if len(data) == 0:
        raise MVFAError("cannot fit the normalisation on an empty image set")
    stats = _MinMax()
    for batch in _branches(model, data, text_features, has_masks, memory_bank, batch_size, precision,
                           memory_chunk_elements, "fitting normalisation", shard=dist.batch_shard(len(data), batch_size),
                           release_dtypes=release_dtypes):
        stats.update("zero_score", batch.zero_score)
        if has_masks:
            stats.update("zero_map", batch.zero_map)
        if memory_bank is not None:
            if has_masks:
                stats.update("few_map", batch.few_map)
            else:
                stats.update("few_score", batch.few_mean)
    if dist.active:
        branches = ["zero_score", *(["zero_map"] if has_masks else [])]
        branches += [] if memory_bank is None else ["few_map" if has_masks else "few_score"]
        stats.reduce(branches, dist)
    return stats.result(len(data), source)


def _local_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `values` as 0-dim tensors; (inf, -inf) when this rank holds none."""
    if values.numel():
        return values.min(), values.max()
    inf = torch.tensor(torch.inf, device=values.device, dtype=values.dtype)
    return inf, -inf


def _global_range(low: torch.Tensor, high: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """The min of `low` and the max of `high` over the ranks (the same 0-dim tensors in a single process)."""
    if not dist.active:
        return low, high
    both = all_reduce(torch.stack([low, -high]), "min", dist)
    return both[0], -both[1]


def _gathered(values: torch.Tensor | None, dist: Dist) -> torch.Tensor | None:
    """Every rank's per-image values, in image order, on every rank (the tensor itself in a single process)."""
    if values is None or not dist.active:
        return values
    return all_gather_cat(values, dist).to(values.device)


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
    normalization: Normalization | None = None,
    keep_maps: bool = False,
    score_under: Normalization | None = None,
    metrics: bool = True,
    dist: Dist = SINGLE,
    release_dtypes: bool = False,
) -> EvalResult:
    """Score every image of `data`; memory_bank None -> zero-shot, else few-shot (the release's fusion).

    normalization None: the release's min-max over the whole set (`result.normalization` records the
    set's statistics). Otherwise the fixed statistics: each image is scored on its own.
    keep_maps: also keep maps for datasets without masks (fixed normalisation only): the det
    branches' maps, normalised like the image score (their image mean is about the score).
    score_under: additionally report the image scores under these statistics (`fixed_scores`).
    metrics False: no metrics (e.g. a set of one class).
    dist: several ranks share the work (module docstring); every rank must call with the same data.
    release_dtypes: on CUDA, score inside the autocast as the release does (`_branches`).
    """
    if normalization is not None:
        return _evaluate_fixed(model, data, text_features, has_masks, memory_bank, batch_size, precision, full_metrics,
                               memory_chunk_elements, desc, normalization, keep_maps, score_under, metrics, dist,
                               release_dtypes)
    if keep_maps and not has_masks:
        raise ValueError("maps of a dataset without masks need a fixed normalization")
    device = next(model.parameters()).device
    size = model.image_size
    count = len(data)
    shard = dist.batch_shard(count, batch_size)
    local = shard[1] - shard[0]
    few_shot = memory_bank is not None
    if score_under is not None:
        _check_covers(score_under, few_shot, has_masks, "the statistics to score under")
    zero_scores = torch.empty(local, device=device)
    few_means = torch.empty(local, device=device) if few_shot and not has_masks else None
    fixed_scores = torch.empty(local, device=device) if score_under is not None else None
    maps = torch.empty(local, size, size, device=device) if has_masks else None
    few_min, few_max = torch.tensor(torch.inf, device=device), torch.tensor(-torch.inf, device=device)
    few_grids = [] if few_shot and has_masks else None
    for batch in _branches(model, data, text_features, has_masks, memory_bank, batch_size, precision,
                           memory_chunk_elements, desc, shard=shard, release_dtypes=release_dtypes):
        start, stop = batch.start - shard[0], batch.stop - shard[0]
        zero_scores[start:stop] = batch.zero_score
        if has_masks:
            maps[start:stop] = batch.zero_map
        if few_shot:
            if has_masks:
                few_grids.append(batch.few_grids)
                few_min, few_max = torch.minimum(few_min, batch.few_map.min()), torch.maximum(few_max, batch.few_map.max())
            else:
                few_means[start:stop] = batch.few_mean
        if fixed_scores is not None:
            fixed_scores[start:stop] = _fixed_batch(batch, score_under, has_masks, few_shot, want_map=False)[0]
    zero_scores, few_means, fixed_scores = (_gathered(v, dist) for v in (zero_scores, few_means, fixed_scores))

    used = _MinMax()  # the set's own statistics, recorded before the maps are normalised in place
    used.update("zero_score", zero_scores)
    if has_masks:
        map_low, map_high = _global_range(*_local_range(maps), dist)
        used.low["zero_map"], used.high["zero_map"] = float(map_low), float(map_high)
        if few_shot:
            few_min, few_max = _global_range(few_min, few_max, dist)
            used.low["few_map"], used.high["few_map"] = float(few_min), float(few_max)
    elif few_shot:
        used.update("few_score", few_means)

    labels = data.labels
    if memory_bank is None:  # the release min-max normalises the zero-shot scores and maps too
        image_scores = scoring.min_max(zero_scores)
        if has_masks:
            scoring.rescale_(maps, map_low, map_high)
    elif has_masks:
        _fuse_in_place(maps, (map_low, map_high), few_grids, few_min, few_max, size)
        image_scores = _gathered(maps.flatten(1).amax(dim=1), dist)
    else:
        image_scores = scoring.fuse(zero_scores, few_means)

    result = EvalResult(image_scores.cpu().numpy(), labels.numpy(), list(data.paths))
    result.normalization = used.result(count, "min-max over this set (the release)")
    if fixed_scores is not None:
        result.fixed_scores = fixed_scores.cpu().numpy()
    if has_masks:
        result.maps, result.masks, result.map_range = maps, data.masks[shard[0] : shard[1]], shard
    if metrics:
        result.metrics = _metrics(result, maps, has_masks, full_metrics, dist)
    return result


def _metrics(result: EvalResult, maps: torch.Tensor | None, has_masks: bool, full_metrics: bool, dist: Dist) -> dict:
    """Image metrics from the gathered scores; pixel metrics from this rank's maps and masks (merged exactly)."""
    if dist.active:
        out = compute_metrics(result.image_scores, result.labels) if full_metrics else {
            "image_auroc": auroc(result.image_scores, result.labels)}
        if has_masks:
            out.update(sharded_pixel_metrics(maps.cpu(), result.masks, NumpyCollective(dist), full_metrics))
        return out
    if full_metrics:
        return compute_metrics(
            result.image_scores, result.labels,
            maps.cpu() if has_masks else None, result.masks if has_masks else None,
        )
    out = {"image_auroc": auroc(result.image_scores, result.labels)}
    if has_masks:
        out["pixel_auroc"] = pixel_auroc(maps.flatten(), result.masks.to(maps.device).flatten())
    return out


def _evaluate_fixed(
    model, data, text_features, has_masks, memory_bank, batch_size, precision, full_metrics, memory_chunk_elements,
    desc, normalization: Normalization, keep_maps: bool, score_under: Normalization | None, metrics: bool,
    dist: Dist = SINGLE, release_dtypes: bool = False,
) -> EvalResult:
    """evaluate() under fixed statistics: batch by batch, nothing depends on the other images."""
    device = next(model.parameters()).device
    size = model.image_size
    shard = dist.batch_shard(len(data), batch_size)
    local = shard[1] - shard[0]
    few_shot = memory_bank is not None
    _check_covers(normalization, few_shot, has_masks, "the normalisation statistics")
    if score_under is not None:
        _check_covers(score_under, few_shot, has_masks, "the statistics to score under")
    want_maps = has_masks or keep_maps
    image_scores = torch.empty(local, device=device)
    fixed_scores = torch.empty(local, device=device) if score_under is not None else None
    maps = torch.empty(local, size, size, device=device) if want_maps else None
    for batch in _branches(model, data, text_features, has_masks, memory_bank, batch_size, precision,
                           memory_chunk_elements, desc, det_maps=want_maps and not has_masks, shard=shard,
                           release_dtypes=release_dtypes):
        start, stop = batch.start - shard[0], batch.stop - shard[0]
        scores, batch_map = _fixed_batch(batch, normalization, has_masks, few_shot, want_maps)
        image_scores[start:stop] = scores
        if want_maps:
            maps[start:stop] = batch_map
        if fixed_scores is not None:
            fixed_scores[start:stop] = _fixed_batch(batch, score_under, has_masks, few_shot, want_map=False)[0]
    image_scores, fixed_scores = _gathered(image_scores, dist), _gathered(fixed_scores, dist)
    result = EvalResult(image_scores.cpu().numpy(), data.labels.numpy(), list(data.paths), normalization=normalization)
    if fixed_scores is not None:
        result.fixed_scores = fixed_scores.cpu().numpy()
    if want_maps:
        result.maps, result.masks, result.map_range = maps, data.masks[shard[0] : shard[1]], shard
    if metrics:
        result.metrics = _metrics(result, maps, has_masks, full_metrics, dist)
    return result


def _fuse_in_place(
    maps: torch.Tensor, map_range: tuple[torch.Tensor, torch.Tensor], few_grids: list[list[torch.Tensor]],
    few_min: torch.Tensor, few_max: torch.Tensor, size: int,
) -> None:
    """maps <- 0.5 mm(maps) + 0.5 mm(memory maps), one batch of memory maps re-upsampled at a time.

    map_range and few_min/few_max: the set-wide ranges of the zero-shot and the memory maps.
    """
    scoring.rescale_(maps, *map_range).mul_(scoring.FUSION_WEIGHT)
    start = 0
    for grids in few_grids:
        few_map = scoring.upsample_and_sum(grids, size)
        stop = start + few_map.shape[0]
        maps[start:stop] += (1 - scoring.FUSION_WEIGHT) * scoring.rescale_(few_map, few_min, few_max)
        start = stop


# ------------------------------------------------------------------------------------------------
# Thresholds

THRESHOLD_RULES = ("f1", "fpr")


def threshold_metrics(scores, labels, threshold: float) -> dict:
    """Counts and rates of the decision `score >= threshold` (abnormal) against labels (1 abnormal)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    predicted = scores >= threshold
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
    }


def _between(upper: float, lower: float) -> float:
    """A value in (lower, upper]: their midpoint, or `upper` when no float lies strictly between."""
    middle = (upper + lower) / 2
    return middle if lower < middle <= upper else upper


def choose_threshold(scores, labels, rule: str = "f1", target_fpr: float = 0.05) -> dict:
    """A decision threshold (abnormal when score >= threshold) from scored reference images.

    f1: the threshold of the best F1 (ties: the highest), placed midway to the next lower score so
        that the reference decisions stay the same; needs normal and abnormal images.
    fpr: the lowest threshold at which at most `target_fpr` of the normal images are flagged
        (midway to the next normal score; just above the highest one when none may be flagged).
    Returns {"threshold", "rule", "target_fpr" (fpr), "reference": threshold_metrics on the images}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if rule not in THRESHOLD_RULES:
        raise MVFAError(f"--threshold_rule {rule!r} is not known: choose one of {', '.join(THRESHOLD_RULES)}")
    normal = np.sort(scores[~labels])
    if rule == "f1":
        positives = np.sort(scores[labels])
        if len(positives) == 0 or len(normal) == 0:
            raise MVFAError("the F1 threshold needs normal and abnormal reference images")
        candidates = np.unique(scores)[::-1]  # descending
        tp = len(positives) - np.searchsorted(positives, candidates, side="left")
        fp = len(normal) - np.searchsorted(normal, candidates, side="left")
        f1 = 2 * tp / (tp + fp + len(positives))
        best = int(np.argmax(f1))  # the first maximum: the highest threshold among ties
        threshold = float(candidates[best])
        if best + 1 < len(candidates):
            threshold = _between(threshold, float(candidates[best + 1]))
        detail = {"threshold": threshold, "rule": "f1"}
    else:
        if not 0.0 < target_fpr < 1.0:
            raise MVFAError(f"--target_fpr {target_fpr} is invalid: use a rate between 0 and 1 (e.g. 0.05)")
        if len(normal) == 0:
            raise MVFAError("the FPR threshold needs normal reference images")
        allowed = int(math.floor(target_fpr * len(normal) + 1e-9))  # normal images that may be flagged
        cut = float(normal[len(normal) - allowed - 1])  # the highest normal score that must stay below
        above = normal[normal > cut]
        threshold = _between(float(above[0]), cut) if len(above) else float(np.nextafter(cut, np.inf))
        if threshold <= cut:
            threshold = float(np.nextafter(cut, np.inf))
        detail = {"threshold": threshold, "rule": "fpr", "target_fpr": float(target_fpr)}
    detail["reference"] = threshold_metrics(scores, labels, threshold)
    return detail
