"""The release's 11-fold support augmentation: original, 4 rotations, 4 translations, 2 flips."""
from __future__ import annotations

import math

import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F

ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
TRANSLATIONS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))  # affine_grid's normalised units
AUGMENTATIONS = 1 + len(ROTATIONS) + len(TRANSLATIONS) + 2


def _warp(images: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """affine_grid + grid_sample (bilinear, reflection padding, align_corners False)."""
    theta = torch.tensor(matrix, dtype=images.dtype, device=images.device).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _versions(images: torch.Tensor) -> list[torch.Tensor]:
    versions = [images]
    for angle in ROTATIONS:
        cos, sin = math.cos(angle), math.sin(angle)
        versions.append(_warp(images, [[cos, -sin, 0.0], [sin, cos, 0.0]]))
    for dx, dy in TRANSLATIONS:
        versions.append(_warp(images, [[1.0, 0.0, dx], [0.0, 1.0, dy]]))
    versions.append(KT.hflip(images))
    versions.append(KT.vflip(images))
    return versions


def augment(images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[k, C, H, W] (+ masks [k, 1, H, W]) -> 11 k images and masks, grouped by transform.

    Without masks (normal images) the masks returned are zeros. Masks are not re-binarised here.
    """
    augmented = torch.cat(_versions(images), dim=0)
    if masks is None:
        return augmented, torch.zeros(augmented.shape[0], 1, *augmented.shape[2:], dtype=images.dtype)
    return augmented, torch.cat(_versions(masks), dim=0)
