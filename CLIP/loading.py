"""Checkpoint forms -> one plain fp32 state dict; architecture inference and checks.

Accepted forms of OpenAI CLIP weights:
- OpenAI's TorchScript archive (e.g. `ViT-L-14-336px.pt`, fp16, with the integer entries
  `input_resolution`, `context_length`, `vocab_size`); the only form that needs `torch.jit.load`;
- a plain state dict, a dict holding it under `state_dict`, keys with a `module.` prefix;
  these load with `torch.load(weights_only=True)`: a checkpoint is data, not code.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig
from .errors import CheckpointError
from .model import resample_positional_embedding

# Entries of OpenAI's archive that are hyper-parameters, not weights.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder and `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.startswith("code/") for name in names) and any(
        name.endswith("constants.pkl") for name in names
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read any accepted checkpoint form into a plain state dict (original dtypes, metadata dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint not found: {path}")
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI ships TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                raw = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler also raises KeyError, IndexError, ... on junk
        raise CheckpointError(f"{path} is not a readable CLIP checkpoint ({_load_failure(err)})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path} holds no state dict (found {type(raw).__name__})")
    state_dict = {}
    for key, value in raw.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key in OPENAI_METADATA_KEYS:
            continue
        if not torch.is_tensor(value):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    for required in ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight"):
        if required not in state_dict:
            raise CheckpointError(f"{path} is not an OpenAI-style CLIP ViT checkpoint: no {required!r} entry")
    return state_dict


def _load_failure(err: Exception) -> str:
    """A short reason for a failed load (torch's messages run to paragraphs of advice)."""
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        return "not a weights-only torch checkpoint: not a torch.save file, or it holds non-tensor objects"
    if isinstance(err, EOFError):
        return "the file ends early: truncated or empty"
    if isinstance(err, (RuntimeError, OSError, ValueError)) and text:
        return text.splitlines()[0].split(". ")[0][:200]
    return f"corrupt data or not a torch checkpoint: {type(err).__name__}"


def _count_blocks(state_dict: dict[str, torch.Tensor], visual: bool) -> int:
    indices = {
        int(match.group(2))
        for key in state_dict
        if (match := _BLOCK_KEY.match(key)) and bool(match.group(1)) == visual
    }
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, torch.Tensor], name: str = "inferred") -> CLIPConfig:
    """The architecture implied by the tensor shapes (head counts use the 64-wide heads of OpenAI's ViTs)."""
    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
    text_width = state_dict["ln_final.weight"].shape[0]
    vision = VisionConfig(
        image_size=grid * patch,
        layers=_count_blocks(state_dict, visual=True),
        width=vision_width,
        patch_size=patch,
    )
    text = TextConfig(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(state_dict, visual=False),
    )
    return CLIPConfig(embed_dim=state_dict["text_projection"].shape[1], vision=vision, text=text, name=name)


def load_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, consume: bool = False,
    keep_dtype_of: tuple[str, ...] = (),
) -> None:
    """Copy weights into `model` after resampling the positional grid to the model's input size.

    Any difference of keys or shapes is a CheckpointError naming the first offending key and both shapes;
    it is raised before any weight is touched.

    A model built on the meta device (no storage, no random initialisation) receives fp32 tensors of
    its own (`load_state_dict(assign=True)`); a materialised model has the weights copied into its
    parameters, dtype converted tensor by tensor. `consume=True` hands the dict over: its entries are
    popped as they are converted, so a half-precision checkpoint and its fp32 copy never coexist whole
    (the dict ends empty). On a meta build, keys starting with one of `keep_dtype_of` keep the
    checkpoint's dtype (e.g. "visual." in fp16 while the text features are computed; the caller
    converts them later with `.float()`, which gives the same fp32 values).
    """
    entries = state_dict if consume else dict(state_dict)
    positional = entries["visual.positional_embedding"]
    entries["visual.positional_embedding"] = resample_positional_embedding(positional.float(), model.visual.grid_size)
    del positional
    expected = model.state_dict()
    _check_entries(entries, expected, source)
    if not _on_meta(expected, source):
        model.load_state_dict(entries)
        return
    owned = {
        key: _owned_tensor(entries.pop(key), copy=not consume, keep_dtype=key.startswith(keep_dtype_of))
        for key in list(expected)
    }
    model.load_state_dict(owned, assign=True)
    _check_materialised(model, source)


def _check_materialised(model: nn.Module, source: str) -> None:
    """After a meta build, every parameter and buffer must hold data (a buffer outside the state dict would not)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    empty = [name for name, tensor in tensors if tensor.is_meta]
    if empty:
        raise CheckpointError(f"{source} left {empty[0]!r} without a value (built on the meta device, not in the state dict)")


def _check_entries(entries: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Same keys and shapes as the model's state dict, else a one-line CheckpointError."""
    for key, tensor in expected.items():
        if key not in entries:
            raise CheckpointError(f"{source} does not fit the model config: it lacks {key!r} (shape {tuple(tensor.shape)})")
        if entries[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source} does not fit the model config: {key!r} has shape {tuple(entries[key].shape)} "
                f"in the checkpoint, {tuple(tensor.shape)} in the model"
            )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source} does not fit the model config: unexpected entry {unexpected[0]!r}")


def _on_meta(expected: dict[str, torch.Tensor], source: str) -> bool:
    """Whether the model was built on the meta device (all of it; a partly built model is refused)."""
    meta = {key for key, tensor in expected.items() if tensor.is_meta}
    if meta and len(meta) != len(expected):
        raise CheckpointError(f"cannot load {source}: the model is partly on the meta device ({sorted(meta)[0]!r})")
    return bool(meta)


def _owned_tensor(value: torch.Tensor, copy: bool, keep_dtype: bool = False) -> torch.Tensor:
    """`value` contiguous and fp32 (in its own dtype when `keep_dtype`); a new one when `copy` (the
    caller keeps the original)."""
    dtype = value.dtype if keep_dtype else torch.float32
    return value.to(dtype, memory_format=torch.contiguous_format, copy=copy)
