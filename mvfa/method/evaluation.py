"""Evaluation: one path that scores a data set with a model and a scorer (mvfa.method.scorer).

`evaluate(model, scorer, data, normalization)` serves zero-shot and few-shot, training-time
selection, calibration, the test scripts and mvfa.predict. Without `normalization` each branch is
min-max normalised over the whole set (the release); with fixed statistics (`fit_normalization`,
e.g. on valid normal images) every image's score depends only on that image (and the support).
Maps are held once at full size; the memory branch keeps only its per-stage patch grids and is
upsampled again when fused (bitwise the same).

Several processes (a `Dist` with more than one rank): each rank scores a contiguous run of whole
evaluation batches (`Dist.batch_shard`: no padding, no duplicates, each image in the same batch as
in one process), the set-wide minima and maxima are reduced over the ranks, the per-image values
are gathered in image order on every rank, and the pixel metrics merge exact counts
(mvfa.metrics.sharded_pixel_metrics). Image scores, predictions and metrics equal a single
process's to the last digit; maps stay with the rank that computed them (`EvalResult.map_range`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dataset.tensors import TensorSet

from mvfa.calibration.normalization import MinMax, Normalization
from mvfa.method.group import group_forward_from_prefix
from mvfa.method.model import AdaptedViT
from mvfa.method.prefix import adapted_tokens, set_prefixes
from mvfa.method.scorer import RawBatch, Scorer
from mvfa.metrics import auroc, compute_metrics, pixel_auroc, sharded_pixel_metrics
from mvfa.runtime.compute import autocast_for, progress
from mvfa.runtime.distributed import SINGLE, Dist, NumpyCollective, gathered_in_order
from mvfa.runtime.errors import MVFAError


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


@torch.no_grad()
def raw_batches(
    model: AdaptedViT, scorer: Scorer, data: TensorSet, batch_size: int, precision: str, desc: str,
    det_maps: bool = False, shard: tuple[int, int] | None = None,
) -> Iterator[RawBatch]:
    """The raw branch values of `data`, batch by batch (the one forward pass every scoring path shares).

    shard: only the batches of images [start, stop), start a multiple of batch_size.
    """
    for (batch,) in raw_batch_groups([model], [scorer], data, batch_size, precision, desc, det_maps, shard):
        yield batch


@torch.no_grad()
def raw_batch_groups(
    models: list[AdaptedViT], scorers: list[Scorer], data: TensorSet, batch_size: int, precision: str, desc: str,
    det_maps: bool = False, shard: tuple[int, int] | None = None,
) -> Iterator[list[RawBatch]]:
    """raw_batches for one model, or for several sibling models (mvfa.method.group) on the same images:
    each batch's frozen prefix (cached or computed once) feeds every model's adapters as one batched
    computation; one RawBatch per model."""
    lead = models[0]
    device = next(lead.parameters()).device
    size = lead.image_size
    count = len(data)
    first, last = shard if shard is not None else (0, count)
    cache = set_prefixes(data, batch_size)
    for start in progress(range(first, last, batch_size), desc):
        stop = min(start + batch_size, count)
        prefix = cache.batch(start // batch_size) if cache is not None else None
        with autocast_for(device, precision):
            images = None if prefix is not None else data.image_batch(start, stop, device)
            if len(models) == 1:
                tokens = [adapted_tokens(lead, images, prefix)]
            else:
                prefix = prefix if prefix is not None else lead.encode_prefix(images)
                tokens = group_forward_from_prefix(models, prefix.repeat(len(models), 1, 1))
        batches = []
        for scorer, model_tokens in zip(scorers, tokens):
            with scorer.scoring_context(device, precision):
                batches.append(RawBatch(start, stop, **scorer.raw(model_tokens.patches(), size, det_maps)))
        del tokens  # not alive during the next batch's forward (4 stages x seg and det x the batch's tokens)
        yield batches
        del batches


@torch.no_grad()
def fit_normalization(
    model: AdaptedViT, scorer: Scorer, data: TensorSet, *, batch_size: int = 8, precision: str = "fp32",
    source: str = "", dist: Dist = SINGLE,
) -> Normalization:
    """Min and max of every branch the scorer has (`scorer.fit_branches`) over `data` (meant for
    normal images not in the support). Training (calibration), the test scripts' --normalize valid and
    so predict use this one function. With several ranks each scores its shard and the minima and
    maxima are reduced over the ranks."""
    if len(data) == 0:
        raise MVFAError("cannot fit the normalisation on an empty image set")
    scorer.refresh(model)
    stats = MinMax()
    shard = dist.batch_shard(len(data), batch_size)
    for batch in raw_batches(model, scorer, data, batch_size, precision, "fitting normalisation", shard=shard):
        for branch in scorer.fit_branches:
            stats.update(branch, batch.branch(branch))
    if dist.active:
        stats.reduce(list(scorer.fit_branches), dist)
    return stats.result(len(data), source)


@torch.no_grad()
def evaluate(
    model: AdaptedViT, scorer: Scorer, data: TensorSet, normalization: Normalization | None = None, *,
    batch_size: int = 8, precision: str = "fp32", full_metrics: bool = False, desc: str = "evaluating",
    keep_maps: bool = False, score_under: Normalization | None = None, metrics: bool = True, dist: Dist = SINGLE,
) -> EvalResult:
    """Score every image of `data` with `scorer` (its reference state brought up to the model's adapters).

    normalization None: the release's min-max over the whole set (`result.normalization` records the
    set's statistics). Otherwise the fixed statistics: each image is scored on its own.
    keep_maps: also keep maps for datasets without masks (fixed normalisation only): the det
    branches' maps, normalised like the image score (their image mean is about the score).
    score_under: additionally report the image scores under these statistics (`fixed_scores`).
    metrics False: no metrics (e.g. a set of one class).
    dist: several ranks share the work (module docstring); every rank must call with the same data.
    """
    has_masks = scorer.has_masks
    if keep_maps and not has_masks and normalization is None:
        raise ValueError("maps of a dataset without masks need a fixed normalization")
    if normalization is not None:
        scorer.check_covers(normalization, "the normalisation statistics")
    if score_under is not None:
        scorer.check_covers(score_under, "the statistics to score under")
    scorer.refresh(model)
    device = next(model.parameters()).device
    size = model.image_size
    shard = dist.batch_shard(len(data), batch_size)
    local = shard[1] - shard[0]
    want_maps = has_masks or keep_maps
    fixed_scores = torch.empty(local, device=device) if score_under is not None else None
    if normalization is None:
        collector = scorer.collector(local, size, device)
    else:
        image_scores = torch.empty(local, device=device)
        maps = torch.empty(local, size, size, device=device) if want_maps else None
    for batch in raw_batches(model, scorer, data, batch_size, precision, desc, det_maps=want_maps and not has_masks,
                             shard=shard):
        start, stop = batch.start - shard[0], batch.stop - shard[0]
        if normalization is None:
            collector.add(batch, start, stop)
        else:
            scores, batch_map = scorer.fixed(batch, normalization, want_maps)
            image_scores[start:stop] = scores
            if want_maps:
                maps[start:stop] = batch_map
        if fixed_scores is not None:
            fixed_scores[start:stop] = scorer.fixed(batch, score_under, want_map=False)[0]
    if normalization is None:
        image_scores, maps, used = collector.finish(dist)
        normalization = used.result(len(data), "min-max over this set (the release)")
    else:
        image_scores = gathered_in_order(image_scores, dist)
    fixed_scores = gathered_in_order(fixed_scores, dist)
    return _result(data, image_scores, maps, normalization, shard, has_masks, full_metrics, metrics, dist,
                   fixed_scores)


def _result(
    data: TensorSet, image_scores: torch.Tensor, maps: torch.Tensor | None, normalization: Normalization,
    shard: tuple[int, int], has_masks: bool, full_metrics: bool, metrics: bool, dist: Dist,
    fixed_scores: torch.Tensor | None = None,
) -> EvalResult:
    """An evaluation's EvalResult: every image's scores, this rank's maps and masks, the metrics."""
    result = EvalResult(image_scores.cpu().numpy(), data.labels.numpy(), list(data.paths), normalization=normalization)
    if fixed_scores is not None:
        result.fixed_scores = fixed_scores.cpu().numpy()
    if maps is not None:
        result.maps, result.masks, result.map_range = maps, data.masks[shard[0] : shard[1]], shard
    if metrics:
        result.metrics = _metrics(result, maps, has_masks, full_metrics, dist)
    return result


@torch.no_grad()
def evaluate_group(
    models: list[AdaptedViT], scorers: list[Scorer], data: TensorSet, *, batch_size: int = 8, precision: str = "fp32",
    desc: str = "evaluating",
) -> list[EvalResult]:
    """`evaluate` (the release's set-wide min-max, image and pixel AUROC) of several runs trained together
    (siblings on one backbone, mvfa.method.group) on the same images in one pass (raw_batch_groups).
    Each run's result equals its own evaluate to float rounding. One process."""
    if len(models) == 1:
        return [evaluate(models[0], scorers[0], data, batch_size=batch_size, precision=precision, desc=desc)]
    for model, scorer in zip(models, scorers):
        scorer.refresh(model)
    device, size, count = next(models[0].parameters()).device, models[0].image_size, len(data)
    collectors = [scorer.collector(count, size, device) for scorer in scorers]
    for batches in raw_batch_groups(models, scorers, data, batch_size, precision, desc):
        for collector, batch in zip(collectors, batches):
            collector.add(batch, batch.start, batch.stop)
    results = []
    for scorer, collector in zip(scorers, collectors):
        image_scores, maps, used = collector.finish(SINGLE)
        normalization = used.result(count, "min-max over this set (the release)")
        results.append(_result(data, image_scores, maps, normalization, (0, count), scorer.has_masks, False, True, SINGLE))
    return results


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
