"""The adapted model built from plain settings: CLIP's towers, the adapters, the text features bank."""
from __future__ import annotations

from pathlib import Path

import torch

from CLIP import create_model
from CLIP.clip import OPENAI

from mvfa.method.model import AdaptedViT
from mvfa.method.text import TextFeatureBank
from mvfa.runtime.errors import MVFAError


def build_adapted_model(
    model_name: str, img_size: int, features_list, clip_ckpt: Path | None, pretrain: str, quick_gelu: bool | None,
    device: torch.device, cache_dir: Path | None, visual_fp32_later: bool = False,
) -> tuple[AdaptedViT, TextFeatureBank]:
    """CLIP (frozen) + adapters on `device`, and the text features bank of the same CLIP.

    visual_fp32_later: the visual tower keeps the checkpoint's dtype until the caller has every text
    feature it needs, drops the text tower and calls `model.visual.float()` or, in a test run,
    `model.float_with_block_workspace()` (the frozen blocks stay in the checkpoint's dtype): the two
    fp32 towers never coexist."""
    pretrained = None
    if pretrain == OPENAI:
        pretrained = clip_ckpt if clip_ckpt is not None else OPENAI
    elif pretrain != "none":
        raise MVFAError(f"--pretrain {pretrain!r} is not known: choose openai (with --clip_ckpt) or none")
    if img_size < 1:
        raise MVFAError(f"--img_size {img_size} is invalid: use a positive number of pixels")
    clip_model = create_model(model_name, img_size, pretrained=pretrained, device=device, quick_gelu=quick_gelu,
                              keep_dtype_of=("visual.",) if visual_fp32_later else ())
    try:
        model = AdaptedViT(clip_model, list(features_list)).to(device)
    except ValueError as err:
        raise MVFAError(f"--features_list {' '.join(map(str, features_list))}: {err}") from None
    return model, TextFeatureBank(clip_model, cache_dir)
