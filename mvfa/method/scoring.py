"""Anomaly scores and maps from per-stage patch tokens (class token removed), batched.

Shapes: a stage's tokens are [B, N, embed] with N = grid * grid patches; text features [embed, 2]
(normal, abnormal). Maps are [B, S, S] at the input size S. All work stays on the tokens' device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_SCALE = 100.0  # CLIP's temperature for patch-text logits
ABNORMAL = 1  # index of the abnormal column of the text features
FUSION_WEIGHT = 0.5  # zero-shot and few-shot branches are averaged after min-max normalisation


def patch_logits(tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[B, N, embed] -> 2-class logits [B, N, 2] = 100 * normalize(tokens) @ T."""
    return LOGIT_SCALE * F.normalize(tokens.float(), dim=-1) @ text_features.to(tokens.device, torch.float32)


def patch_abnormality(tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-patch abnormal probability A_l: softmax over the 2 classes, abnormal column; [B, N]."""
    return patch_logits(tokens, text_features).softmax(dim=-1)[..., ABNORMAL]


def stage_image_scores(stage_tokens: list[torch.Tensor], text_features: torch.Tensor) -> torch.Tensor:
    """Mean over patches of A_l per stage: [stages, B] (the det loss uses each stage's row)."""
    return torch.stack([patch_abnormality(tokens, text_features).mean(dim=-1) for tokens in stage_tokens])


def zero_shot_image_score(det_tokens: list[torch.Tensor], text_features: torch.Tensor) -> torch.Tensor:
    """Sum over stages of the mean patch abnormality; [B]."""
    return stage_image_scores(det_tokens, text_features).sum(dim=0)


def _to_grid(values: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, C, g, g]."""
    batch, patches, channels = values.shape
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid (was the class token removed?)")
    return values.transpose(1, 2).reshape(batch, channels, grid, grid)


def upsample(grid_values: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear, align_corners True, as the release."""
    return F.interpolate(grid_values, size=(image_size, image_size), mode="bilinear", align_corners=True)


def stage_probability_maps(tokens: torch.Tensor, text_features: torch.Tensor, image_size: int) -> torch.Tensor:
    """One stage's 2-class probabilities at full size, [B, 2, S, S]: logits upsampled, then softmax."""
    return upsample(_to_grid(patch_logits(tokens, text_features)), image_size).softmax(dim=1)


def zero_shot_map(seg_tokens: list[torch.Tensor], text_features: torch.Tensor, image_size: int) -> torch.Tensor:
    """Sum over stages of the abnormal probability maps; [B, S, S]."""
    return sum(stage_probability_maps(t, text_features, image_size)[:, ABNORMAL] for t in seg_tokens)


def normalize_bank(bank: torch.Tensor) -> torch.Tensor:
    """A memory bank's rows as unit fp32 vectors: pass it with `normalized=True` to the functions below
    so that a bank searched by many batches is normalised once, not on every search."""
    return F.normalize(bank.float(), dim=-1)


def normalize_bank_(bank: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`normalize_bank` in place on an fp32 bank, bitwise the same (F.normalize: the row norms clamped
    at eps, then one division), without a second bank."""
    return bank.div_(bank.norm(2, dim=-1, keepdim=True).clamp_min(eps))


def max_cosine_to_bank(
    queries: torch.Tensor, bank: torch.Tensor, max_elements: int = 1 << 24, normalized: bool = False
) -> torch.Tensor:
    """For each query row, the largest cosine similarity to any bank row: [Q, D] x [M, D] -> [Q].

    The bank is visited in chunks so that at most `max_elements` similarities exist at once.
    normalized: the bank comes from `normalize_bank` (on the queries' device); it is used as is.
    """
    queries = F.normalize(queries.float(), dim=-1)
    bank = bank.to(queries.device, torch.float32)
    if not normalized:
        bank = F.normalize(bank, dim=-1)
    chunk = max(1, max_elements // max(1, queries.shape[0]))
    best = None  # in the products' dtype: fp32, or fp16 under CUDA autocast (the release's dtype)
    for start in range(0, bank.shape[0], chunk):
        similarity = (queries @ bank[start : start + chunk].T).amax(dim=1)
        best = similarity if best is None else torch.maximum(best, similarity)
    return best if best is not None else torch.full((queries.shape[0],), -torch.inf, device=queries.device)


def memory_distance_grids(
    stage_tokens: list[torch.Tensor], memory_bank: list[torch.Tensor], max_elements: int = 1 << 24,
    normalized: bool = False,
) -> list[torch.Tensor]:
    """Per stage, 1 - max cosine of each patch to the stage's memory bank, as [B, 1, g, g] grids.

    normalized: every stage's bank comes from `normalize_bank`."""
    grids = []
    for tokens, bank in zip(stage_tokens, memory_bank, strict=True):
        batch, patches, dim = tokens.shape
        similarity = max_cosine_to_bank(tokens.reshape(-1, dim), bank, max_elements, normalized)
        grids.append(_to_grid((1.0 - similarity).reshape(batch, patches, 1)))
    return grids


def upsample_and_sum(grids: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """Upsample each stage's [B, 1, g, g] grid to the image size and sum over stages: [B, S, S]."""
    return sum(upsample(grid, image_size)[:, 0] for grid in grids)


def few_shot_map(
    stage_tokens: list[torch.Tensor], memory_bank: list[torch.Tensor], image_size: int, max_elements: int = 1 << 24,
    normalized: bool = False,
) -> torch.Tensor:
    """Sum over stages of (1 - max cosine to the stage's memory bank), upsampled; [B, S, S]."""
    return upsample_and_sum(memory_distance_grids(stage_tokens, memory_bank, max_elements, normalized), image_size)


def rescale_(values: torch.Tensor, low, high) -> torch.Tensor:
    """In place: (v - low) / (high - low); only v - low where high == low (a constant has no ranking: no 0 / 0)."""
    values.sub_(low)
    if high > low:
        values.div_(high - low)
    return values


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min) over the whole tensor (the release's global normalisation)."""
    return rescale_(values.clone(), values.min(), values.max())


def fuse(zero_shot: torch.Tensor, few_shot: torch.Tensor) -> torch.Tensor:
    """0.5 * mm(zero-shot) + 0.5 * mm(few-shot), min-max over each whole tensor."""
    return FUSION_WEIGHT * min_max(zero_shot) + (1 - FUSION_WEIGHT) * min_max(few_shot)
