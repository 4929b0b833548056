"""Training losses of the release: focal + dice on seg maps, BCE on det image scores."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
DET_LOSS_FORMS = ("release", "bce")


class FocalLoss(nn.Module):
    """Focal loss on class probabilities [B, C, H, W] against an integer mask [B, 1, H, W] or [B, H, W].

    The one-hot target is clamped to [smooth / (C - 1), 1 - smooth]; pt = sum(onehot * p) + smooth;
    loss = -alpha * (1 - pt)^gamma * log(pt), averaged over pixels (alpha = 1 for every class).
    """

    def __init__(self, gamma: float = FOCAL_GAMMA, smooth: float = FOCAL_SMOOTH) -> None:
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.pixel_losses(probabilities, target).mean()

    def per_image(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each image's loss (the mean over its pixels): [B]."""
        return self.pixel_losses(probabilities, target).reshape(probabilities.shape[0], -1).mean(dim=1)

    def pixel_losses(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each pixel's loss, image by image: [B * H * W]."""
        classes = probabilities.shape[1]
        flat = probabilities.flatten(2).transpose(1, 2).reshape(-1, classes)
        labels = target.reshape(-1).long()
        one_hot = F.one_hot(labels, classes).to(flat.dtype)
        one_hot = one_hot.clamp(self.smooth / (classes - 1), 1.0 - self.smooth)
        pt = (one_hot * flat).sum(dim=1) + self.smooth
        return -((1 - pt) ** self.gamma) * pt.log()


class BinaryDiceLoss(nn.Module):
    """1 - (2 * sum(p * m) + 1) / (sum(p) + sum(m) + 1) per image, averaged over the batch."""

    def __init__(self, smooth: float = DICE_SMOOTH) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1 - self.coefficients(probabilities, target).sum() / target.shape[0]

    def per_image(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each image's loss, 1 - its dice coefficient: [B]."""
        return 1 - self.coefficients(probabilities, target)

    def coefficients(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each image's smoothed dice coefficient: [B]."""
        batch = target.shape[0]
        p, m = probabilities.reshape(batch, -1), target.reshape(batch, -1).to(probabilities.dtype)
        return (2 * (p * m).sum(dim=1) + self.smooth) / (p.sum(dim=1) + m.sum(dim=1) + self.smooth)


def det_loss(
    image_probability: torch.Tensor, labels: torch.Tensor, form: str = "release", reduction: str = "mean",
) -> torch.Tensor:
    """BCE of a stage's mean patch abnormality against the image labels (averaged over the batch, or
    per image with reduction "none").

    form "release": the probability is passed where a logit is expected (BCE-with-logits), as the
    release does and as its numbers need; form "bce": the textbook binary cross-entropy on the probability.
    """
    labels = labels.to(image_probability.dtype)
    if form == "release":
        return F.binary_cross_entropy_with_logits(image_probability, labels, reduction=reduction)
    if form == "bce":
        return F.binary_cross_entropy(image_probability.clamp(1e-7, 1 - 1e-7), labels, reduction=reduction)
    raise ValueError(f"unknown det loss form {form!r}: choose one of {', '.join(DET_LOSS_FORMS)}")
