"""The training step: multi-level losses on a batch, two Adam optimisers (seg and det adapters).

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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import scoring
from .distributed import Dist, average_gradients
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
