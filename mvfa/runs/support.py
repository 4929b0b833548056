"""The support of a few-shot run: chosen, decoded, augmented once, and its frozen-block outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dataset.medical import MedicalDataset, Sample, Support, select_support
from dataset.tensors import TensorSet

from mvfa.method.augment import augment
from mvfa.method.model import AdaptedViT
from mvfa.method.prefix import PrefixBudget, PrefixCache, compute_prefixes, prefix_bytes
from mvfa.runs.config import RunConfig

@dataclass
class FewShotData:
    """The augmented support of a few-shot run (mvfa.runs.training.FewShotSupport's fields) and its prefix caches."""

    support_images: torch.Tensor | None  # augmented abnormal then augmented normal (None in test runs: no training)
    support_masks: torch.Tensor | None
    support_labels: torch.Tensor | None
    normal_images: torch.Tensor  # augmented normal (the memory bank's images)
    support_samples: list[Sample]
    support_prefixes: torch.Tensor | None = None  # frozen-block outputs of each support image (batch 1)
    memory_cache: PrefixCache | None = None  # the same for the memory bank's evaluation batches


def cache_support_prefixes(model: AdaptedViT, few_shot: FewShotData, config: RunConfig, budget: PrefixBudget) -> None:
    """Frozen-block outputs of the augmented support: per image for training, per batch for the memory bank."""
    device = next(model.parameters()).device
    count = len(few_shot.support_labels) if few_shot.support_labels is not None else 0
    if count and budget.allow(prefix_bytes(model, count)):
        per_image = compute_prefixes(model, (few_shot.support_images[i : i + 1].to(device) for i in range(count)), config.precision)
        few_shot.support_prefixes = torch.cat(per_image.batches)
    if budget.allow(prefix_bytes(model, len(few_shot.normal_images))):
        size = config.eval_batch_size
        batches = (few_shot.normal_images[i : i + size].to(device) for i in range(0, len(few_shot.normal_images), size))
        few_shot.memory_cache = compute_prefixes(model, batches, config.precision, size)


def prepare_few_shot(config: RunConfig, dataset: MedicalDataset) -> tuple[FewShotData, Support]:
    """The support (the seed list's or a draw), decoded and augmented once, as the release: a test run
    decodes only the normal images (the memory bank's)."""
    support = select_support(dataset, config.shot, config.iterate, config.seed, list(config.fewshot_seed_dirs))
    if not config.train:  # a test run needs the memory bank's images only: the drawn abnormal images are never loaded
        aug_normal, _ = augment(TensorSet.load(support.normal, config.img_size, desc="support").float_images())
        samples = list(support.normal) if config.only_normal else [*support.abnormal, *support.normal]
        return FewShotData(None, None, None, aug_normal, samples), support
    abnormal = TensorSet.load(support.abnormal, config.img_size, desc="support")
    normal = TensorSet.load(support.normal, config.img_size, desc="support")
    abnormal_masks = abnormal.masks[:, None].float() if dataset.has_masks else None
    aug_abnormal, aug_abnormal_masks = augment(abnormal.float_images(), abnormal_masks)
    aug_normal, aug_normal_masks = augment(normal.float_images())
    data = FewShotData(
        support_images=torch.cat([aug_abnormal, aug_normal]),
        support_masks=torch.cat([aug_abnormal_masks, aug_normal_masks]),
        support_labels=torch.cat([torch.ones(len(aug_abnormal)), torch.zeros(len(aug_normal))]),
        normal_images=aug_normal,
        support_samples=[*support.abnormal, *support.normal],
    )
    return data, support
