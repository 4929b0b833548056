"""Text features of the prompt ensemble: T = [t_normal, t_abnormal], shape [embed_dim, 2].

They depend only on the text tower's weights, the activation and the prompts, so they are cached on
disk (`<cache_dir>/text/<key>.pt`), keyed by a fingerprint of exactly those. An entry also records
that fingerprint, the word and the format, and is used only when they match and its features are
float32 [embed_dim, 2] finite unit columns; any other entry (foreign, malformed, unreadable) is
recomputed and atomically replaced, with a one-line note. A cache folder that cannot be written
turns the disk cache off for the run, with a one-line note.
"""
from __future__ import annotations

from collections.abc import Callable
import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from CLIP.model import CLIP, context_used
from CLIP.tokenizer import tokenize

from mvfa.method.model import hash_tensors, save_checkpoint
from mvfa.method.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, state_sentences
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.heap import trim_heap

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
    one tensor at a time; the value equals hashing each tensor's `.numpy().tobytes()`.
    """
    digest = hashlib.sha256(json.dumps({"quick_gelu": clip_model.config.quick_gelu}).encode())
    hash_tensors(digest, ((name, t) for name, t in clip_model.state_dict().items() if not name.startswith("visual.")))
    return digest.hexdigest()


class TextFeatureBank:
    """Text features per object word: computed once per word, and cached on disk across runs.

    cache_dir None disables the disk cache (features are still computed once per word and process).
    encoding_autocast: a context (e.g. CUDA fp16 autocast, as the release encodes its prompts) to
    encode under, and its name, which keeps its features apart in the cache; None: plain fp32.
    """

    def __init__(
        self, clip_model: CLIP, cache_dir: Path | None = None,
        encoding_autocast: tuple[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
    ) -> None:
        self.clip_model = clip_model
        self.cache_dir = cache_dir
        self.encoding_autocast = encoding_autocast
        self._features: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None

    def cache_path(self, object_word: str) -> Path:
        if self._fingerprint is None:
            self._fingerprint = text_tower_fingerprint(self.clip_model)
        prompts = [CACHE_FORMAT, self._fingerprint, object_word, NORMAL_STATES, ABNORMAL_STATES, TEMPLATES]
        if self.encoding_autocast is not None:
            prompts.append(self.encoding_autocast[0])
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
        features = self._read_cached(object_word) if self.cache_dir is not None else None
        if features is None:
            with self.encoding_autocast[1]() if self.encoding_autocast is not None else contextlib.nullcontext():
                features = encode_prompt_ensemble(self.clip_model, object_word).cpu()
            if self.cache_dir is not None:
                self._write_cached(object_word, features)
        self._features[object_word] = features.to(device)
        return self._features[object_word]

    def _read_cached(self, object_word: str) -> torch.Tensor | None:
        """The cached features, or None (absent, or unusable: then a note says why)."""
        path = self.cache_path(object_word)
        try:
            if not path.is_file():
                return None
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable file or foreign data: torch raises several types
            problem = f"is unreadable ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})"
        else:
            problem = self._entry_problem(entry, object_word)
        if problem is None:
            return entry["features"]
        print(f"note: text-feature cache entry {path} {problem}; recomputing and replacing it")
        return None

    def _entry_problem(self, entry, object_word: str) -> str | None:
        """What makes a cache entry unusable for this text tower and word, or None."""
        if not isinstance(entry, dict):
            return f"holds a {type(entry).__name__}, not a dict"
        if entry.get("format") != CACHE_FORMAT or "fingerprint" not in entry:
            return "was written in another format (it records no fingerprint of the text weights)"
        if entry["fingerprint"] != self._fingerprint or entry.get("object_word") != object_word:
            return "was computed for other text weights or another word"
        features = entry.get("features")
        expected = (self.clip_model.config.embed_dim, 2)
        if not torch.is_tensor(features):
            return f"holds features of type {type(features).__name__}, not a tensor"
        if features.dtype != torch.float32 or tuple(features.shape) != expected:
            return f"holds {features.dtype} features of shape {tuple(features.shape)}, not float32 {expected}"
        if not torch.isfinite(features).all():
            return "holds NaN or infinite features"
        if (features.norm(dim=0) - 1).abs().max() > 1e-3:
            return "holds features that are not unit vectors"
        return None

    def _write_cached(self, object_word: str, features: torch.Tensor) -> None:
        """Write (atomically) the entry; a folder that cannot be written turns the disk cache off for this run."""
        path = self.cache_path(object_word)
        entry = {"format": CACHE_FORMAT, "fingerprint": self._fingerprint, "object_word": object_word, "features": features}
        try:
            save_checkpoint(entry, path)
        except (OSError, RuntimeError) as err:  # torch.save's writer raises RuntimeError for a failed write
            reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            print(
                f"note: cannot write the text-feature cache in {self.cache_dir} ({reason}); running without the disk "
                f"cache (give a writable --cache_dir, or --cache_dir none)"
            )
            self.cache_dir = None
