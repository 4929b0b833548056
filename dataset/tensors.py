"""Image sets decoded once into tensors (uint8 images, bool masks), reused by every evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from mvfa.runtime.compute import progress
from mvfa.runtime.errors import MVFAError

from .medical import ImageSet, Sample

PIXEL_LEVELS = 255  # decoded images are k / 255: kept as uint8 and divided on use (exact)
LOAD_BATCH = 16  # images decoded per DataLoader batch


@dataclass
class TensorSet:
    """A set of images decoded once and reused by every evaluation."""

    images: torch.Tensor  # [N, 3, S, S] uint8
    masks: torch.Tensor  # [N, S, S] bool
    labels: torch.Tensor  # [N] int64
    paths: list[str]
    prefix_cache: Any = None  # mvfa.method.prefix.PrefixCache of the frozen blocks' outputs, when computed

    @classmethod
    def load(cls, samples: list[Sample], img_size: int, num_workers: int = 0, desc: str = "loading") -> "TensorSet":
        loader = DataLoader(ImageSet(samples, img_size), batch_size=LOAD_BATCH, num_workers=num_workers)
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
        """Images start..stop as ToTensor's floats on `device`."""
        return self.images[start:stop].to(device).float() / PIXEL_LEVELS

    def float_images(self) -> torch.Tensor:
        """Every image as ToTensor's floats (on the CPU)."""
        return self.images.float() / PIXEL_LEVELS
