"""A small OpenAI-style CLIP ViT backbone: configs, model, checkpoint loading and tokenizer."""
from .clip import create_model
from .config import CLIPConfig, TextConfig, VisionConfig, list_models, load_config
from .errors import CheckpointError, CLIPError, ConfigError, TokenizerError
from .model import CLIP
from .tokenizer import tokenize

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
