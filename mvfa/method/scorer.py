"""How adapted tokens become image scores and maps: one scorer per mode, owning its reference state.

- `ZeroShotScorer` (text features): image score = sum over stages of the mean patch abnormality (det
  tokens); with masks, map = sum over stages of the text-alignment maps (seg tokens).
- `FewShotScorer` (text features and a memory bank): with masks, map = 0.5 mm(zero-shot map) +
  0.5 mm(memory map) and image score = the map's maximum; without masks, score = 0.5 mm(zero-shot
  score) + 0.5 mm(mean of the det memory map).
mm is min-max, over the whole scored set (the release) or with fixed statistics (`Normalization`).

A scorer turns one batch's tokens into its raw branch values (`raw`), scores a batch under fixed
statistics (`fixed`), names the branches its statistics need, and collects a whole set for the
release's set-wide min-max (`collector`). mvfa.method.evaluation drives it over a data set.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mvfa.calibration.normalization import MinMax, Normalization, affine
from mvfa.method import scoring
from mvfa.method.memory_bank import MemoryBank, bank_branch, build_memory_bank
from mvfa.method.model import AdaptedViT, StageTokens
from mvfa.method.prefix import PrefixCache
from mvfa.runtime.compute import autocast_for
from mvfa.runtime.distributed import Dist, all_reduce, gathered_in_order
from mvfa.runtime.errors import MVFAError

MEMORY_CHUNK_ELEMENTS = 1 << 24  # bank similarities are computed in chunks of at most this many elements


@dataclass
class RawBatch:
    """Raw branch values of one batch (images start..stop of the set)."""

    start: int
    stop: int
    zero_score: torch.Tensor  # [b] zero-shot image score (det)
    zero_map: torch.Tensor | None = None  # [b, S, S] zero-shot map: seg with masks, det when asked for without
    few_grids: list[torch.Tensor] | None = None  # memory distance grids per stage (few-shot)
    few_map: torch.Tensor | None = None  # [b, S, S] memory map (few-shot)
    few_mean: torch.Tensor | None = None  # [b] memory map's mean (few-shot, datasets without masks)

    def branch(self, name: str) -> torch.Tensor:
        """The values of a `Normalization` branch."""
        return {"zero_score": self.zero_score, "zero_map": self.zero_map, "few_map": self.few_map,
                "few_score": self.few_mean}[name]


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


@dataclass(frozen=True)
class ScoringMode:
    """What a scorer is before its reference state exists (e.g. to check a checkpoint's statistics)."""

    mode: str  # "zero-shot" or "few-shot"
    has_masks: bool

    @property
    def normalization_branches(self) -> tuple[str, ...]:
        """The branches fixed statistics of this scoring must cover."""
        scorer = FewShotScorer if self.mode == "few-shot" else ZeroShotScorer
        return scorer.branches_needed(self.has_masks)


class Scorer:
    """What both modes share; see the module docstring."""

    mode: str
    fit_branches: tuple[str, ...]  # the branches fit_normalization collects
    normalization_branches: tuple[str, ...]  # the branches fixed statistics must cover
    score_is_map_max = False  # the image score is the maximum of the image's map

    def __init__(self, text_features: torch.Tensor, has_masks: bool, release_dtypes: bool = False,
                 memory_chunk_elements: int = MEMORY_CHUNK_ELEMENTS) -> None:
        self.text_features = text_features
        self.has_masks = has_masks
        self.release_dtypes = release_dtypes  # on CUDA, score inside the forward's autocast, as the release
        self.memory_chunk_elements = memory_chunk_elements

    @property
    def scoring_mode(self) -> ScoringMode:
        return ScoringMode(self.mode, self.has_masks)

    def refresh(self, model: AdaptedViT) -> None:
        """Bring the reference state up to the model's current adapters (nothing for zero-shot)."""

    def scoring_context(self, device: torch.device, precision: str) -> contextlib.AbstractContextManager:
        """release_dtypes: score inside the autocast (fp16 patch-text products, bank similarities and
        upsampling, as the release on CUDA); otherwise in fp32 after it. The same on the CPU."""
        return autocast_for(device, precision) if self.release_dtypes else contextlib.nullcontext()

    def raw(self, tokens: StageTokens, size: int, det_maps: bool = False) -> dict:
        """The raw branch values of a batch's patch tokens (RawBatch's fields)."""
        zero_map = None
        if self.has_masks:
            zero_map = scoring.zero_shot_map(tokens.seg, self.text_features, size)
        elif det_maps:
            zero_map = scoring.zero_shot_map(tokens.det, self.text_features, size)
        return {"zero_score": scoring.zero_shot_image_score(tokens.det, self.text_features), "zero_map": zero_map}

    def check_covers(self, norm: Normalization, what: str) -> None:
        missing = norm.missing(self.normalization_branches)
        if missing:
            raise MVFAError(
                f"{what} ({norm.source or 'no source'}) lack the {', '.join(missing)} branch statistics that "
                f"{self.mode} scoring {'with' if self.has_masks else 'without'} masks needs"
            )

    def fixed(self, batch: RawBatch, norm: Normalization, want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image scores, map or None) of one batch under fixed statistics."""
        raise NotImplementedError

    def collector(self, local: int, size: int, device: torch.device) -> "SetCollector":
        """Collects this rank's `local` images for the set-wide min-max (the release's normalisation)."""
        raise NotImplementedError


class SetCollector:
    """A set's raw values batch by batch; `finish` applies the set-wide min-max.

    finish(dist) -> (image scores of every image, this rank's maps or None, the set's statistics).
    """

    def __init__(self, scorer: Scorer, local: int, size: int, device: torch.device) -> None:
        self.has_masks, self.size = scorer.has_masks, size
        self.zero_scores = torch.empty(local, device=device)
        self.maps = torch.empty(local, size, size, device=device) if scorer.has_masks else None

    def add(self, batch: RawBatch, start: int, stop: int) -> None:
        self.zero_scores[start:stop] = batch.zero_score
        if self.has_masks:
            self.maps[start:stop] = batch.zero_map


class ZeroShotScorer(Scorer):
    mode = "zero-shot"

    def __init__(self, text_features: torch.Tensor, has_masks: bool, **options) -> None:
        super().__init__(text_features, has_masks, **options)
        self.fit_branches = self.normalization_branches = self.branches_needed(has_masks)

    @staticmethod
    def branches_needed(has_masks: bool) -> tuple[str, ...]:
        """The branches fixed statistics of zero-shot scoring must cover."""
        return ("zero_score", "zero_map") if has_masks else ("zero_score",)

    def fixed(self, batch: RawBatch, norm: Normalization, want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        score = affine(batch.zero_score, norm.bounds("zero_score"))
        if self.has_masks:
            return score, affine(batch.zero_map, norm.bounds("zero_map"))
        return score, (affine(batch.zero_map, norm.bounds("zero_score")) if want_map else None)

    def collector(self, local: int, size: int, device: torch.device) -> SetCollector:
        return _ZeroShotCollector(self, local, size, device)


class _ZeroShotCollector(SetCollector):
    def finish(self, dist: Dist) -> tuple[torch.Tensor, torch.Tensor | None, MinMax]:
        zero_scores = gathered_in_order(self.zero_scores, dist)
        used = MinMax()  # the set's own statistics, recorded before the maps are normalised in place
        used.update("zero_score", zero_scores)
        image_scores = scoring.min_max(zero_scores)
        if self.has_masks:
            map_low, map_high = _global_range(*_local_range(self.maps), dist)
            used.low["zero_map"], used.high["zero_map"] = float(map_low), float(map_high)
            scoring.rescale_(self.maps, map_low, map_high)
        return image_scores, self.maps, used


class FewShotScorer(Scorer):
    """The few-shot scorer; its memory bank is given (a bank file), or built from its support images
    with the model's current adapters by `refresh` (a run: after every change of the adapters)."""

    mode = "few-shot"

    def __init__(self, text_features: torch.Tensor, has_masks: bool, bank: MemoryBank | None = None, *,
                 support_images: torch.Tensor | None = None, support_cache: PrefixCache | None = None,
                 batch_size: int = 8, bank_precision: str = "fp32", **options) -> None:
        super().__init__(text_features, has_masks, **options)
        if bank is None and support_images is None:
            raise ValueError("a few-shot scorer needs a memory bank or the support images to build one")
        self.bank = bank
        self.bank_branch = bank_branch(has_masks)
        self.support_images, self.support_cache = support_images, support_cache
        self.batch_size, self.bank_precision = batch_size, bank_precision
        self._built_for: tuple[AdaptedViT, list[torch.Tensor]] | None = None  # the model and adapters of the bank
        self.fit_branches = ("zero_score", "zero_map", "few_map") if has_masks else ("zero_score", "few_score")
        self.normalization_branches = self.branches_needed(has_masks)
        self.score_is_map_max = has_masks

    @staticmethod
    def branches_needed(has_masks: bool) -> tuple[str, ...]:
        """The branches fixed statistics of few-shot scoring must cover."""
        return ("zero_map", "few_map") if has_masks else ("zero_score", "few_score")

    def refresh(self, model: AdaptedViT) -> None:
        """The bank of the current adapters, for the one branch this dataset's scoring reads; kept when
        the bank was built by the same model with adapters equal to the current ones (several
        evaluations of one state: the protocols of a run trained together, calibration and the test)."""
        if self.support_images is None:
            return
        adapters = [parameter.detach() for parameter in model.adapter_parameters()]
        if self._built_for is not None and self._built_for[0] is model and all(
            torch.equal(now, then) for now, then in zip(adapters, self._built_for[1], strict=True)
        ):
            return
        self.bank = build_memory_bank(model, self.support_images, self.batch_size, self.bank_precision, self.support_cache,
                                      branches=(self.bank_branch,))
        self._built_for = (model, [adapter.clone() for adapter in adapters])

    def raw(self, tokens: StageTokens, size: int, det_maps: bool = False) -> dict:
        values = super().raw(tokens, size, det_maps)
        if self.bank is None:
            raise ValueError("the few-shot scorer has no memory bank yet: call refresh(model) first")
        few_grids = scoring.memory_distance_grids(
            getattr(tokens, self.bank_branch), self.bank.stages(self.bank_branch), self.memory_chunk_elements,
            normalized=True,
        )
        few_map = scoring.upsample_and_sum(few_grids, size)
        few_mean = None if self.has_masks else few_map.mean(dim=(1, 2))
        return {**values, "few_grids": few_grids, "few_map": few_map, "few_mean": few_mean}

    def fixed(self, batch: RawBatch, norm: Normalization, want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = scoring.FUSION_WEIGHT
        if self.has_masks:
            fused = weight * affine(batch.zero_map, norm.bounds("zero_map")) + (1 - weight) * affine(
                batch.few_map, norm.bounds("few_map")
            )
            return fused.flatten(1).amax(dim=1), fused
        score = weight * affine(batch.zero_score, norm.bounds("zero_score")) + (1 - weight) * affine(
            batch.few_mean, norm.bounds("few_score")
        )
        if not want_map:
            return score, None
        fused = weight * affine(batch.zero_map, norm.bounds("zero_score")) + (1 - weight) * affine(
            batch.few_map, norm.bounds("few_score")
        )
        return score, fused

    def collector(self, local: int, size: int, device: torch.device) -> SetCollector:
        return _FewShotCollector(self, local, size, device)


class _FewShotCollector(SetCollector):
    def __init__(self, scorer: Scorer, local: int, size: int, device: torch.device) -> None:
        super().__init__(scorer, local, size, device)
        self.few_means = None if self.has_masks else torch.empty(local, device=device)
        self.few_grids: list[list[torch.Tensor]] = []  # with masks: the memory grids, upsampled again when fused
        self.few_min, self.few_max = torch.tensor(torch.inf, device=device), torch.tensor(-torch.inf, device=device)

    def add(self, batch: RawBatch, start: int, stop: int) -> None:
        super().add(batch, start, stop)
        if self.has_masks:
            self.few_grids.append(batch.few_grids)
            self.few_min = torch.minimum(self.few_min, batch.few_map.min())
            self.few_max = torch.maximum(self.few_max, batch.few_map.max())
        else:
            self.few_means[start:stop] = batch.few_mean

    def finish(self, dist: Dist) -> tuple[torch.Tensor, torch.Tensor | None, MinMax]:
        zero_scores, few_means = gathered_in_order(self.zero_scores, dist), gathered_in_order(self.few_means, dist)
        used = MinMax()  # the set's own statistics, recorded before the maps are normalised in place
        used.update("zero_score", zero_scores)
        if not self.has_masks:
            used.update("few_score", few_means)
            return scoring.fuse(zero_scores, few_means), None, used
        map_range = _global_range(*_local_range(self.maps), dist)
        few_min, few_max = _global_range(self.few_min, self.few_max, dist)
        used.low["zero_map"], used.high["zero_map"] = float(map_range[0]), float(map_range[1])
        used.low["few_map"], used.high["few_map"] = float(few_min), float(few_max)
        self._fuse_in_place(map_range, few_min, few_max)
        return gathered_in_order(self.maps.flatten(1).amax(dim=1), dist), self.maps, used

    def _fuse_in_place(self, map_range: tuple[torch.Tensor, torch.Tensor], few_min: torch.Tensor,
                       few_max: torch.Tensor) -> None:
        """maps <- 0.5 mm(maps) + 0.5 mm(memory maps), one batch of memory maps re-upsampled at a time."""
        scoring.rescale_(self.maps, *map_range).mul_(scoring.FUSION_WEIGHT)
        start = 0
        for grids in self.few_grids:
            few_map = scoring.upsample_and_sum(grids, self.size)
            stop = start + few_map.shape[0]
            self.maps[start:stop] += (1 - scoring.FUSION_WEIGHT) * scoring.rescale_(few_map, few_min, few_max)
            start = stop
