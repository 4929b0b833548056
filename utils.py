"""The release's utils: `augment`, `encode_text_with_prompt_ensemble`, `cos_sim` (logic lives in mvfa)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mvfa.method.augment import augment
from mvfa.method.text import encode_prompt_ensemble

__all__ = ["augment", "cos_sim", "encode_text_with_prompt_ensemble"]


def encode_text_with_prompt_ensemble(model, obj: str, device: torch.device | str) -> torch.Tensor:
    """Text features [embed_dim, 2] (normal, abnormal) for the object word `obj` (e.g. REAL_NAME["Brain"])."""
    return encode_prompt_ensemble(model, obj, device)


def cos_sim(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every row of a [n, d] with every row of b [m, d]: [n, m]."""
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).T
