"""Model configs: dataclasses and the JSON registry in `model_configs/`.

A config file uses the release's (and open_clip's) JSON format::

    {"embed_dim": 768,
     "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
     "quick_gelu": false}

Registered configs may also name the OpenAI weights file (`openai_file`) and its sha256.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CKPT_DIR = Path(__file__).resolve().parent / "ckpt"
DEFAULT_HEAD_WIDTH = 64
DEFAULT_MLP_RATIO = 4.0


@dataclass(frozen=True)
class VisionConfig:
    image_size: int  # the size the weights were trained at (sets the positional grid)
    layers: int
    width: int
    patch_size: int
    head_width: int = DEFAULT_HEAD_WIDTH
    mlp_ratio: float = DEFAULT_MLP_RATIO

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = DEFAULT_MLP_RATIO


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False
    name: str = "custom"
    openai_file: str | None = None
    openai_sha256: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def with_quick_gelu(self, quick_gelu: bool | None) -> "CLIPConfig":
        return self if quick_gelu is None else replace(self, quick_gelu=bool(quick_gelu))


def list_models() -> list[str]:
    """Names of the registered configs (file stems in `model_configs/`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_from_dict(raw: dict, name: str = "custom") -> CLIPConfig:
    """Build a config from the JSON format; raises ConfigError naming the missing or bad entry."""
    try:
        vision_raw = dict(raw["vision_cfg"])
        text_raw = dict(raw["text_cfg"])
        vision = VisionConfig(
            image_size=int(vision_raw["image_size"]),
            layers=int(vision_raw["layers"]),
            width=int(vision_raw["width"]),
            patch_size=int(vision_raw["patch_size"]),
            head_width=int(vision_raw.get("head_width", DEFAULT_HEAD_WIDTH)),
            mlp_ratio=float(vision_raw.get("mlp_ratio", DEFAULT_MLP_RATIO)),
        )
        text = TextConfig(
            context_length=int(text_raw.get("context_length", 77)),
            vocab_size=int(text_raw.get("vocab_size", 49408)),
            width=int(text_raw["width"]),
            heads=int(text_raw["heads"]),
            layers=int(text_raw["layers"]),
            mlp_ratio=float(text_raw.get("mlp_ratio", DEFAULT_MLP_RATIO)),
        )
        config = CLIPConfig(
            embed_dim=int(raw["embed_dim"]),
            vision=vision,
            text=text,
            quick_gelu=bool(raw.get("quick_gelu", False)),
            name=name,
            openai_file=raw.get("openai_file"),
            openai_sha256=raw.get("openai_sha256"),
        )
    except KeyError as err:
        raise ConfigError(f"model config {name!r} lacks the entry {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model config {name!r} has a malformed entry: {err}") from None
    if vision.width % vision.head_width:
        raise ConfigError(
            f"model config {name!r}: vision width {vision.width} is not a multiple of head_width {vision.head_width}"
        )
    if text.width % text.heads:
        raise ConfigError(f"model config {name!r}: text width {text.width} is not a multiple of heads {text.heads}")
    return config


def load_config(name_or_path: str | Path) -> CLIPConfig:
    """A registered config by name (e.g. "ViT-L-14-336") or any JSON config file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.is_file():
        path, name = candidate, candidate.stem
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
    else:
        path, name = CONFIG_DIR / f"{name_or_path}.json", str(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"unknown model {str(name_or_path)!r}: choose one of {', '.join(list_models())} or pass a JSON config path"
            )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read model config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model config {path} must hold a JSON object, found {type(raw).__name__}")
    return config_from_dict(raw, name=name)
