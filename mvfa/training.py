"""Training: the step (multi-level losses on a batch, two Adam optimisers for the seg and det
adapters) and the loop around it (epochs of batches, model selection, the few- and zero-shot batches).

Per image, summed over stages (the release's loss):
- det: BCE of the stage's mean patch abnormality (det tokens) against the image label;
- seg (images of datasets with masks): focal + dice on the upsampled 2-class probabilities.
A batch of B images averages the per-image losses, so batch 1 is exactly the release's step.

Data-parallel (--ddp): every rank computes the loss of its own part of the batch, and the adapters'
gradients are then averaged over the ranks, weighted by their image counts, in one all-reduce
(mvfa.distributed.average_gradients), so a step of W ranks equals one step on the concatenated
batch. An explicit all-reduce rather than torch's DistributedDataParallel: DDP hooks the wrapped
module's forward only, while training also enters through forward_from_prefix (prefix cache), the
seg optimiser must step exactly when some rank's batch had masks, and the last batch of an epoch
may leave a rank with fewer images, or none, which plain DDP averaging would weight wrongly.

The loop reads its settings from any object with the fields of `LoopSettings` (mvfa.engine's
RunConfig), so that this module never imports the engine.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from dataset.medical import ImageSet, MedicalDataset

from . import scoring
from .distributed import SINGLE, Dist, average_gradients, broadcast_parameters
from .evaluation import PIXEL_LEVELS, TensorSet, autocast_for, progress
from .losses import BinaryDiceLoss, FocalLoss, det_loss
from .model import AdaptedViT

ADAM_BETAS = (0.5, 0.999)
MASK_THRESHOLD = 0.5


@dataclass
class LossParts:
    total: torch.Tensor
    det: torch.Tensor
    seg: torch.Tensor | None


@dataclass
class Optimizers:
    seg: torch.optim.Optimizer
    det: torch.optim.Optimizer

    def zero_grad(self) -> None:
        self.seg.zero_grad(set_to_none=True)
        self.det.zero_grad(set_to_none=True)


def make_optimizers(model: AdaptedViT, learning_rate: float) -> Optimizers:
    return Optimizers(
        seg=torch.optim.Adam(model.seg_adapters.parameters(), lr=learning_rate, betas=ADAM_BETAS),
        det=torch.optim.Adam(model.det_adapters.parameters(), lr=learning_rate, betas=ADAM_BETAS),
    )


def compute_loss(
    model: AdaptedViT,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    has_masks: torch.Tensor,
    det_loss_form: str = "release",
    prefix: torch.Tensor | None = None,
) -> LossParts:
    """Loss of a batch. text_features: [embed, 2] or per image [B, embed, 2]; has_masks: [B] bool.

    `prefix` (the frozen blocks' output for `images`, e.g. from a cache) skips recomputing them.
    """
    tokens = (model(images) if prefix is None else model.forward_from_prefix(prefix)).patches()
    stage_scores = scoring.stage_image_scores(tokens.det, text_features)  # [stages, B]
    det = sum(det_loss(scores, labels, det_loss_form) for scores in stage_scores)
    if not bool(has_masks.any()):
        return LossParts(total=det, det=det, seg=None)
    focal, dice = FocalLoss(), BinaryDiceLoss()
    selected = has_masks.nonzero().flatten()
    target = (masks[selected] > MASK_THRESHOLD).float()
    seg_text = text_features[selected] if text_features.dim() == 3 else text_features
    seg = 0.0
    for stage_tokens in tokens.seg:
        probabilities = scoring.stage_probability_maps(stage_tokens[selected], seg_text, model.image_size)
        seg = seg + focal(probabilities, target) + dice(probabilities[:, scoring.ABNORMAL], target)
    # The seg loss averages over the images that have masks; weight it by their share of the batch.
    seg = seg * (selected.numel() / images.shape[0])
    return LossParts(total=seg + det, det=det, seg=seg)


def train_step(
    model: AdaptedViT,
    optimizers: Optimizers,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    has_masks: torch.Tensor,
    det_loss_form: str = "release",
    prefix: torch.Tensor | None = None,
    dist: Dist | None = None,
) -> LossParts:
    """One optimisation step; the seg optimiser steps only when the batch holds images with masks.

    `dist` (data-parallel, several ranks): this rank's part of the batch, possibly empty; the
    gradients become those of the mean loss over every rank's images before the Adam steps, and
    the returned `total` is that mean (`det` and `seg` stay this rank's).
    """
    optimizers.zero_grad()
    if dist is None or not dist.active:
        parts = compute_loss(model, images, masks, labels, text_features, has_masks, det_loss_form, prefix)
        parts.total.backward()
        if parts.seg is not None:
            optimizers.seg.step()
        optimizers.det.step()
        return parts
    count = int(images.shape[0])
    parts = None
    if count:
        parts = compute_loss(model, images, masks, labels, text_features, has_masks, det_loss_form, prefix)
        parts.total.backward()
    local_loss = parts.total.item() if parts is not None else 0.0
    local_seg = parts is not None and parts.seg is not None
    _, mean_loss, any_seg = average_gradients(model.adapter_parameters(), count, local_loss, local_seg, dist)
    if any_seg:
        optimizers.seg.step()
    optimizers.det.step()
    zero = torch.zeros(())
    return LossParts(
        total=torch.tensor(mean_loss), det=parts.det if parts is not None else zero, seg=parts.seg if parts is not None else None
    )


# ------------------------------------------------------------------------------------------------
# The loop


class LoopSettings(Protocol):
    """The run settings the training loop and the batch builders read (mvfa.engine.RunConfig has them)."""

    epoch: int
    learning_rate: float
    batch_size: int
    precision: str
    det_loss: str
    select: str
    ddp: bool
    seed: int
    img_size: int
    num_workers: int


class FewShotSupport(Protocol):
    """The augmented support a few-shot run trains on (mvfa.engine.FewShotData has it)."""

    support_images: torch.Tensor | None
    support_masks: torch.Tensor | None
    support_labels: torch.Tensor | None
    support_prefixes: torch.Tensor | None


def train_loop(
    config: LoopSettings, model: AdaptedViT, batches: Callable[[int], Iterable[tuple]], selector: Selector,
    log_rows: list[dict], device: torch.device, dist: Dist = SINGLE,
) -> dict:
    """The loop: epochs of `batches(epoch)` (sized, iterable); `selector` scores the current adapters when due.

    Several ranks: without --ddp each trains the same batches; rank 0's adapters (a single
    process's, whatever the others' GPU rounding did) are broadcast before every evaluation and at
    the end, so all ranks evaluate, select and return the same adapters. With --ddp every rank
    trains its part of each batch (`batches` gives it) and the gradients are averaged.
    """
    optimizers = make_optimizers(model, config.learning_rate)
    parallel = dist if config.ddp and dist.active else None
    effective = {}
    if config.ddp:
        effective = {"effective_batch_size": dist.world_size * config.batch_size}
        print(
            f"data-parallel (--ddp): {dist.world_size} rank{'s' if dist.world_size > 1 else ''} x --batch_size "
            f"{config.batch_size} = effective batch {effective['effective_batch_size']} images per step"
        )
    best = {"score": -float("inf"), "epoch": 0, "adapters": model.adapter_state()}
    for epoch in range(1, config.epoch + 1):
        losses = []
        epoch_batches = batches(epoch)
        total = len(epoch_batches)
        checkpoints = selector.due(total)
        bar = progress(epoch_batches, f"epoch {epoch}/{config.epoch}")
        for step, (images, masks, labels, features, has_masks, prefix) in enumerate(bar, start=1):
            with autocast_for(device, config.precision):
                parts = train_step(
                    model, optimizers, images.to(device), masks.to(device), labels.to(device),
                    features.to(device), has_masks.to(device), config.det_loss, prefix, parallel,
                )
            losses.append(parts.total.item())
            if step in checkpoints:
                broadcast_parameters(model.adapter_parameters(), dist)
                value, detail = selector.score()
                row = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)), **effective, **detail}
                log_rows.append(row)
                if value is not None and value > best["score"]:
                    best = {"score": value, "epoch": epoch, "adapters": model.adapter_state()}
        summary = f"epoch {epoch}/{config.epoch}: loss {np.mean(losses) if losses else float('nan'):.4f}"
        if log_rows and log_rows[-1]["epoch"] == epoch:
            summary += "".join(
                f", {k} {v:.4f}" for k, v in log_rows[-1].items() if k not in ("epoch", "step", "loss", *effective)
            )
        print(summary, flush=True)
    if config.select == "last" or config.epoch == 0:
        broadcast_parameters(model.adapter_parameters(), dist)
        best = {"score": None, "epoch": config.epoch, "adapters": model.adapter_state()}
    else:
        print(f"selected epoch {best['epoch']} ({config.select} {best['score']:.4f})")
    return best


class Selector:
    """When (which steps of an epoch) and how the current adapters are scored for model selection."""

    def __init__(self, config: LoopSettings, evals_per_epoch: int, scorer: Callable[[], tuple[float | None, dict]]) -> None:
        self.evals_per_epoch = evals_per_epoch if config.select != "last" else 0
        self.scorer = scorer

    def due(self, steps: int) -> set[int]:
        """The steps (from 1) of an epoch of `steps` batches after which the adapters are scored."""
        if self.evals_per_epoch == 0 or steps == 0:
            return set()
        return {max(1, (steps * (i + 1)) // self.evals_per_epoch) for i in range(self.evals_per_epoch)}

    def score(self) -> tuple[float | None, dict]:
        """(the selection value, None for none; the log row's entries) of the current adapters."""
        return self.scorer()


def few_shot_batches(
    config: LoopSettings, few_shot: FewShotSupport, text_features: torch.Tensor, has_masks: bool,
) -> Callable[[int], list[tuple]]:
    """Each epoch: the augmented support (abnormal label 1, normal label 0), shuffled, in batches."""
    generator = torch.Generator().manual_seed(config.seed)
    count = len(few_shot.support_labels)
    mask_flags = torch.full((count,), has_masks, dtype=torch.bool)

    def batches(epoch: int) -> list:
        order = torch.randperm(count, generator=generator)
        out = []
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            prefix = few_shot.support_prefixes[index] if few_shot.support_prefixes is not None else None
            out.append(
                (few_shot.support_images[index], few_shot.support_masks[index], few_shot.support_labels[index],
                 text_features, mask_flags[index], prefix)
            )
        return out

    return batches


def zero_shot_batches(
    config: LoopSettings, sources: list[MedicalDataset], text_features_of: Callable[[MedicalDataset], torch.Tensor],
    may_decode: Callable[[int], bool], dist: Dist = SINGLE,
) -> Callable[[int], Iterable[tuple]]:
    """Each epoch: the source datasets' test splits, shuffled; each image with its own dataset's text.

    `text_features_of(source)` gives a source's text features. The sources are decoded once into
    uint8 tensors when `may_decode(nbytes)` allows their size (the engine's prefix-cache budget; the
    release decodes every PNG every epoch; --prefix_cache off keeps that). Either way an epoch's order is
    the one a shuffling DataLoader draws from the seeded generator, so the batches are the same.
    """
    features, flags, samples, source_of = [], [], [], []
    for index, source in enumerate(sources):
        features.append(text_features_of(source))
        flags.append(source.has_masks)
        split = source.samples("test")
        samples.extend(split)
        source_of.extend([index] * len(split))
    all_features = torch.stack(features)
    all_flags = torch.tensor(flags)
    source_of = torch.tensor(source_of, dtype=torch.long)
    dataset = ImageSet(samples, config.img_size)
    decoded = None
    if may_decode(len(dataset) * 3 * config.img_size**2):
        decoded = TensorSet.load(samples, config.img_size, config.num_workers, desc="zero-shot sources")

    def as_batch(index: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(images, masks, labels, each image's own text features, has-masks flags, no prefix)."""
        source = source_of[index]
        return images, masks, labels.float(), all_features[source].cpu(), all_flags[source], None

    def load(indices: list[int]) -> tuple:
        """The batch of `indices`: from the decoded tensors, else decoded here (none: an empty batch)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if decoded is not None:
            return as_batch(index, decoded.images[index].float() / PIXEL_LEVELS, decoded.masks[index][:, None].float(),
                            decoded.labels[index])
        if not indices:
            size = config.img_size
            return as_batch(index, torch.empty(0, 3, size, size), torch.empty(0, 1, size, size), torch.empty(0))
        batch = default_collate([dataset[i] for i in indices])
        return as_batch(index, batch["image"], batch["mask"], batch["label"])

    generator = torch.Generator().manual_seed(config.seed)
    data_parallel = config.ddp and dist.active
    per_step = config.batch_size * (dist.world_size if data_parallel else 1)
    rank_offset = dist.rank * config.batch_size if data_parallel else 0

    class EpochBatches:
        """One epoch: the shuffled order cut into steps of `per_step` images, this rank's run of each."""

        def __init__(self) -> None:
            order = epoch_order(len(dataset), generator)
            self.parts = []
            for first in range(0, len(order), per_step):
                start = first + rank_offset
                self.parts.append(order[start : min(start + config.batch_size, first + per_step, len(order))])

        def __len__(self) -> int:
            return len(self.parts)

        def __iter__(self):
            if decoded is not None or config.num_workers == 0:
                return (load(part) for part in self.parts)
            return self._from_workers()

        def _from_workers(self):
            """Decoding in worker processes, in this epoch's order (empty parts stay empty batches)."""
            filled = [part for part in self.parts if part]
            loader = iter(DataLoader(  # its own generator: the global random state stays untouched
                dataset, batch_sampler=filled, num_workers=config.num_workers, generator=torch.Generator()
            )) if filled else iter(())
            for part in self.parts:
                if not part:
                    yield load(part)
                    continue
                batch = next(loader)
                yield as_batch(torch.as_tensor(part, dtype=torch.long), batch["image"], batch["mask"], batch["label"])

    return lambda epoch: EpochBatches()


def epoch_order(count: int, generator: torch.Generator) -> list[int]:
    """The order in which `DataLoader(..., shuffle=True, generator=generator)` visits `count` items.

    A shuffling DataLoader draws from its generator when an epoch starts (the workers' base seed,
    then the sampler's seed), so drawing through an identical DataLoader over the indices keeps the
    release's epoch orders for a given seed whether images come from disk or from memory.
    """
    if count == 0:
        return []
    shuffle = DataLoader(range(count), batch_size=count, shuffle=True, generator=generator)
    return next(iter(shuffle)).tolist()
