"""Runs trained together: adapted models on one frozen backbone (AdaptedViT.sibling) whose forward
from the frozen prefix is one batched computation. The frozen blocks process every run's images as
one batch; each run's adapters act on its own images through batched matrix products, so a group of
R runs costs one forward of R images instead of R forwards of one.

Each run's tokens equal its own forward's to float rounding (a batched product may sum in another
order than R single ones); its gradients reach only its own adapters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mvfa.method.model import ADAPTER_MIX, LEAKY_SLOPE, STREAM_KEEP, AdaptedViT, ResidualAdapter, StageTokens


def stacked_adapter(adapters: list[ResidualAdapter], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run r's adapter on x[r]: x [R, rows, width] -> (mid [R, rows, embed_dim], out [R, rows, width])."""
    fc1 = torch.stack([adapter.fc1[0].weight for adapter in adapters]).transpose(1, 2)
    mid = F.leaky_relu(torch.bmm(x, fc1), LEAKY_SLOPE)
    fc2 = torch.stack([adapter.fc2[0].weight for adapter in adapters]).transpose(1, 2)
    return mid, F.leaky_relu(torch.bmm(mid, fc2), LEAKY_SLOPE)


def check_group(models: list[AdaptedViT]) -> None:
    """Runs trained together share one frozen backbone and its stages."""
    lead = models[0]
    for model in models[1:]:
        if model.visual is not lead.visual or model.stages != lead.stages:
            raise ValueError("models trained together must share one backbone and its stages (AdaptedViT.sibling)")


def group_tokens(models: list[AdaptedViT], prefix: torch.Tensor) -> StageTokens:
    """Every run's stage tokens from the frozen prefix of every run's images: prefix [R * b, tokens,
    width], run r's b images at rows r * b .. (r + 1) * b (the same b for every run); the tokens keep
    that order ([R * b, tokens, embed_dim] per stage), so a loss can be computed for all runs at once."""
    check_group(models)
    runs, lead = len(models), models[0]
    if prefix.shape[0] % runs:
        raise ValueError(f"{prefix.shape[0]} prefixes cannot be shared by {runs} runs: give each run the same count")
    images = prefix.shape[0] // runs
    x = prefix
    seg: list[torch.Tensor] = []
    det: list[torch.Tensor] = []
    for index, stage in enumerate(lead.stages):
        if index > 0:
            x = lead.run_blocks(x, lead.stages[index - 1], stage)
        tokens, width = x.shape[1], x.shape[2]
        per_run = x.reshape(runs, images * tokens, width)
        seg_mid, seg_out = stacked_adapter([model.seg_adapters[index] for model in models], per_run)
        det_mid, det_out = stacked_adapter([model.det_adapters[index] for model in models], per_run)
        per_run = STREAM_KEEP * per_run + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
        x = per_run.reshape(runs * images, tokens, width)
        seg.append(seg_mid.reshape(runs * images, tokens, -1))
        det.append(det_mid.reshape(runs * images, tokens, -1))
    return StageTokens(seg, det)


def group_forward_from_prefix(models: list[AdaptedViT], prefix: torch.Tensor) -> list[StageTokens]:
    """`group_tokens` split per run: run r's StageTokens (views of its b rows)."""
    joint = group_tokens(models, prefix)
    images = prefix.shape[0] // len(models)
    return [StageTokens([t[r * images : (r + 1) * images] for t in joint.seg],
                        [t[r * images : (r + 1) * images] for t in joint.det]) for r in range(len(models))]
