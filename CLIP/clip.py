"""`create_model`: a config (by name or JSON path) + optional weights -> a CLIP model (release name)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .config import CKPT_DIR, CLIPConfig, load_config
from .errors import CheckpointError
from .loading import load_into, read_state_dict
from .model import CLIP

OPENAI = "openai"


def openai_checkpoint_path(config: CLIPConfig) -> Path:
    """Where OpenAI's file for this model is expected: `CLIP/ckpt/<OpenAI file name>`."""
    if not config.openai_file:
        raise CheckpointError(f"model {config.name!r} has no OpenAI weights; pass a checkpoint path instead")
    return CKPT_DIR / config.openai_file


def resolve_pretrained(config: CLIPConfig, pretrained: str | Path) -> Path:
    path = openai_checkpoint_path(config) if str(pretrained) == OPENAI else Path(pretrained)
    if not path.is_file():
        hint = ""
        if config.openai_file:
            hint = f"; download OpenAI's {config.openai_file} and place it at {openai_checkpoint_path(config)}"
        raise CheckpointError(f"CLIP checkpoint not found: {path}{hint}")
    return path


def create_model(
    model_name: str | Path,
    img_size: int | None = None,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    check_config: bool = True,
    keep_dtype_of: tuple[str, ...] = (),
) -> CLIP:
    """Build a CLIP ViT for inputs of `img_size` pixels (default: the config's training size).

    model_name: a registered config ("ViT-L-14-336") or a path to a JSON config.
    pretrained: None (random weights), a checkpoint path in any accepted form, or "openai"
        (`CLIP/ckpt/<OpenAI file name>`). The positional grid is resampled to `img_size`.
    quick_gelu: overrides the config's activation (exact GELU unless the config says otherwise).
    The model is fp32 and in eval mode; autocast on CUDA is the caller's choice.
    keep_dtype_of: key prefixes whose weights stay in the checkpoint's dtype until the caller converts
        them (`model.visual.float()`): a test run computes its text features before the visual tower
        is fp32, so the two fp32 towers are never resident together (see `load_into`).
    """
    config = load_config(model_name).with_quick_gelu(quick_gelu)
    state_dict = None
    if pretrained is not None:  # read (and check) the weights before building: bad input fails fast
        path = resolve_pretrained(config, pretrained)
        state_dict = read_state_dict(path)
        if check_config:
            _check_trained_grid(config, state_dict, path)
    if state_dict is None:
        model = CLIP(config, image_size=img_size)
    else:
        model = build_on_meta(config, img_size)
        load_into(model, state_dict, source=str(path), consume=True, keep_dtype_of=keep_dtype_of)
    return model.to(device).eval()


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips the random initialisers of meta tensors, which hold no values to initialise.

    Not only a saving of work: `normal_` on the meta device (nn.Embedding's init) imports
    torch._dynamo: 0.16 GB and most of the ViT-L meta build's 1.2 s (0.4 s without it), in a process
    that never compiles anything. So does any out-of-place arithmetic on a meta tensor, which is why
    the model scales its random parameters in place, `randn(...).mul_(scale)`."""

    INITIALIZERS = frozenset({torch.nn.init.normal_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INITIALIZERS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if tensor is not None and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_on_meta(config: CLIPConfig, img_size: int | None = None) -> CLIP:
    """The model's structure without storage or random initialisation (the weights come from a checkpoint).

    CLIP holds no buffers: every tensor of its state dict is a parameter the checkpoint provides."""
    with torch.device("meta"), _SkipInitOnMeta():
        return CLIP(config, image_size=img_size)


def _check_trained_grid(config: CLIPConfig, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """The checkpoint's positional grid must be the config's training grid (it is resampled after)."""
    found = tuple(state_dict["visual.positional_embedding"].shape)
    expected = (config.vision.grid_size**2 + 1, config.vision.width)
    if found != expected:
        raise CheckpointError(
            f"{path} does not fit model {config.name!r}: 'visual.positional_embedding' has shape {found} "
            f"in the checkpoint, {expected} in the config (image_size {config.vision.image_size})"
        )
