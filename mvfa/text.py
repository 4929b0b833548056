"""Text features of the prompt ensemble: T = [t_normal, t_abnormal], shape [embed_dim, 2].

They depend only on the text tower's weights, the activation and the prompts, so they are cached on
disk (`<cache_dir>/text/<key>.pt`), keyed by a fingerprint of exactly those.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from CLIP.model import CLIP, context_used
from CLIP.tokenizer import tokenize

from .errors import MVFAError
from .heap import trim_heap
from .model import hash_tensors, save_checkpoint
from .prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, state_sentences

CACHE_ENV = "MVFA_CACHE_DIR"
CACHE_FORMAT = "mvfa-text-features/1"
PROMPT_BATCH = 35  # sentences encoded at once: one state's templates; bounds the transient memory


def default_cache_dir() -> Path:
    """$MVFA_CACHE_DIR, else ~/.cache/mvfa."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mvfa")


@torch.no_grad()
def encode_prompt_ensemble(clip_model: CLIP, object_word: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Mean of the L2-normalised sentence embeddings of each state, normalised again; [embed_dim, 2] fp32.

    A state's sentences are encoded PROMPT_BATCH at a time, all at the context length of the longest
    one: the features are those of one batch of all of them (tested), at a fraction of the
    activations (0.2 GB transient on ViT-L for a whole state).
    """
    device = device if device is not None else next(clip_model.parameters()).device
    columns = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        tokens = tokenize(state_sentences(object_word, states)).to(device)
        context = context_used(tokens)
        embeddings = torch.cat([
            clip_model.encode_text(tokens[start : start + PROMPT_BATCH], context=context).float()
            for start in range(0, tokens.shape[0], PROMPT_BATCH)
        ])
        columns.append(F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def text_tower_fingerprint(clip_model: CLIP) -> str:
    """sha256 of the text tower's weights (every parameter outside `visual.`) and its activation.

    Each tensor's bytes as C-contiguous fp32 are hashed from its own buffer (hashlib reads the numpy
    view): a CPU fp32 contiguous tensor is not copied; another dtype, device or layout is converted
    one tensor at a time. The value is the one the former `.numpy().tobytes()` form gave.
    """
    digest = hashlib.sha256(json.dumps({"quick_gelu": clip_model.config.quick_gelu}).encode())
    hash_tensors(digest, ((name, t) for name, t in clip_model.state_dict().items() if not name.startswith("visual.")))
    return digest.hexdigest()


class TextFeatureBank:
    """Text features per object word: computed once per word, and cached on disk across runs.

    cache_dir None disables the disk cache (features are still computed once per word and process).
    """

    def __init__(self, clip_model: CLIP, cache_dir: Path | None = None) -> None:
        self.clip_model = clip_model
        self.cache_dir = cache_dir
        self._features: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None

    def cache_path(self, object_word: str) -> Path:
        if self._fingerprint is None:
            self._fingerprint = text_tower_fingerprint(self.clip_model)
        prompts = [CACHE_FORMAT, self._fingerprint, object_word, NORMAL_STATES, ABNORMAL_STATES, TEMPLATES]
        key = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:32]
        return self.cache_dir / "text" / f"{key}.pt"

    def drop_text_tower(self) -> None:
        """Free the CLIP text tower once every needed word's features are here (a test run needs one),
        and hand the freed heap back to the system (`heap.trim_heap`)."""
        self.clip_model.drop_text_tower()
        trim_heap()

    def __call__(self, object_word: str) -> torch.Tensor:
        if object_word in self._features:
            return self._features[object_word]
        if not self.clip_model.has_text_tower:
            raise MVFAError(f"text features for {object_word!r} were asked for after the text tower was dropped")
        device = next(self.clip_model.parameters()).device
        features = None
        path = self.cache_path(object_word) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                features = torch.load(path, map_location="cpu", weights_only=True)["features"]
            except Exception:  # an unreadable cache entry is recomputed and rewritten
                features = None
        if features is None:
            features = encode_prompt_ensemble(self.clip_model, object_word).cpu()
            if path is not None:
                save_checkpoint({"features": features, "object_word": object_word}, path)
        self._features[object_word] = features.to(device)
        return self._features[object_word]

