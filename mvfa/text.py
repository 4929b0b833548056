"""Text features of the prompt ensemble: T = [t_normal, t_abnormal], shape [embed_dim, 2]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from CLIP.model import CLIP
from CLIP.tokenizer import tokenize

from .prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences


@torch.no_grad()
def encode_prompt_ensemble(clip_model: CLIP, object_word: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Mean of the L2-normalised sentence embeddings of each state, normalised again; [embed_dim, 2] fp32."""
    device = device if device is not None else next(clip_model.parameters()).device
    columns = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        tokens = tokenize(state_sentences(object_word, states)).to(device)
        embeddings = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


class TextFeatureBank:
    """Text features per object word, computed once per word and reused."""

    def __init__(self, clip_model: CLIP) -> None:
        self.clip_model = clip_model
        self._features: dict[str, torch.Tensor] = {}

    def __call__(self, object_word: str) -> torch.Tensor:
        if object_word not in self._features:
            self._features[object_word] = encode_prompt_ensemble(self.clip_model, object_word)
        return self._features[object_word]
