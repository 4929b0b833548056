"""A small OpenAI-style CLIP ViT backbone: configs, model, checkpoint loading and tokenizer.

The public names are imported from their submodules on first use (PEP 562), so that importing
`CLIP.errors` or `CLIP.config`, as the command-line parsers do, does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "CLIP": "model",
    "CLIPConfig": "config",
    "CLIPError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "TextConfig": "config",
    "TokenizerError": "errors",
    "VisionConfig": "config",
    "create_model": "clip",
    "list_models": "config",
    "load_config": "config",
    "tokenize": "tokenizer",
}

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPError",
    "CheckpointError",
    "ConfigError",
    "TextConfig",
    "TokenizerError",
    "VisionConfig",
    "create_model",
    "list_models",
    "load_config",
    "tokenize",
]

if TYPE_CHECKING:
    from .clip import create_model
    from .config import CLIPConfig, TextConfig, VisionConfig, list_models, load_config
    from .errors import CheckpointError, CLIPError, ConfigError, TokenizerError
    from .model import CLIP
    from .tokenizer import tokenize


def __getattr__(name: str):
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
