"""Shared helpers for the CLIP/ tests: a tiny OpenAI-style architecture, a randomised open_clip
reference model with the same sizes, and its weights saved in every accepted checkpoint form.

open_clip is only the independent reference; nothing here is copied from it.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# The tiny architecture (OpenAI layout, small sizes): vision 2 heads of 64, text 2 heads of 32.
EMBED_DIM = 64
VISION = {"image_size": 56, "layers": 4, "width": 128, "patch_size": 14, "head_width": 64}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TRAIN_SIZE = VISION["image_size"]  # 4 x 4 patch grid
OTHER_SIZE = 42  # 3 x 3 patch grid: the positional grid is resampled
OPENAI_METADATA = {"input_resolution": TRAIN_SIZE, "context_length": TEXT["context_length"], "vocab_size": TEXT["vocab_size"]}

PROMPTS = [
    "a photo of a damaged brain.",
    "flawless liver",
    "there is the histopathological image in the scene.",
    "a jpeg corrupted photo of a retinal OCT with defect.",
]


def one_torch_thread():
    """Generator for an autouse module fixture: these tiny models run fastest on one thread, and several
    OpenMP threads on a busy 2-core machine slow them down by 10x; the setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_line(err, *named) -> str:
    """The message of a raised error (a pytest.ExceptionInfo): one non-empty line naming each of `named`."""
    message = str(err.value)
    assert message and "\n" not in message and all(str(part) in message for part in named), message
    return message


def config_dict(quick_gelu: bool | None = None, **vision_overrides) -> dict:
    raw = {"embed_dim": EMBED_DIM, "vision_cfg": {**VISION, **vision_overrides}, "text_cfg": dict(TEXT)}
    if quick_gelu is not None:
        raw["quick_gelu"] = quick_gelu
    return raw


def write_config(path: Path, quick_gelu: bool | None = None, **vision_overrides) -> Path:
    path.write_text(json.dumps(config_dict(quick_gelu, **vision_overrides), indent=2))
    return path


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


def make_open_clip(quick_gelu: bool, image_size: int = TRAIN_SIZE):
    """open_clip's CLIP in the OpenAI layout: class-token pooling, no attentional pooler, pre-norm,
    ln_pre, proj, argmax text pooling, causal mask. Its default init (weights are loaded over it)."""
    import open_clip

    vision_cfg = open_clip.model.CLIPVisionCfg(
        layers=VISION["layers"],
        width=VISION["width"],
        head_width=VISION["head_width"],
        patch_size=VISION["patch_size"],
        image_size=image_size,
        attentional_pool=False,
        no_ln_pre=False,
        pool_type="tok",
        final_ln_after_pool=False,
        pos_embed_type="learnable",
    )
    text_cfg = open_clip.model.CLIPTextCfg(
        context_length=TEXT["context_length"],
        vocab_size=TEXT["vocab_size"],
        width=TEXT["width"],
        heads=TEXT["heads"],
        layers=TEXT["layers"],
        pool_type="argmax",
        no_causal_mask=False,
        embed_cls=False,
        proj_bias=False,
        final_ln_after_pool=False,
    )
    model = open_clip.model.CLIP(EMBED_DIM, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    return model.eval()


def random_openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under OpenAI's keys, every tensor perturbed (LayerNorm affine and all biases too)."""
    from CLIP.config import config_from_dict
    from CLIP.model import CLIP

    torch.manual_seed(seed)
    template = CLIP(config_from_dict(config_dict()))  # OpenAI's keys and shapes (open_clip loads them strictly)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, tensor in template.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        is_layer_norm = ".ln_" in key or key.startswith("ln_")
        if is_layer_norm and key.endswith(".weight"):
            value = 1.0 + 0.2 * noise
        elif key.endswith("bias"):
            value = 0.1 * noise
        elif key == "logit_scale":
            value = torch.tensor(4.0)
        else:  # keep the init's scale, but make every entry differ from it
            value = tensor + 0.02 * noise
        state_dict[key] = value.float().contiguous()
    return state_dict


def open_clip_with(state_dict: dict[str, torch.Tensor], quick_gelu: bool, image_size: int = TRAIN_SIZE):
    """The open_clip reference holding `state_dict` (resampled to `image_size` by open_clip itself)."""
    import open_clip

    model = make_open_clip(quick_gelu, image_size)
    state_dict = {key: value.float().clone() for key, value in state_dict.items()}
    open_clip.model.resize_pos_embed(state_dict, model)  # no-op at the training size
    model.load_state_dict(state_dict)
    return model


class _Node(nn.Module):
    """A namespace module: holds OpenAI-named parameters and children, computes nothing."""


class _OpenAIArchive(nn.Module):
    """Parameters under OpenAI's dotted names plus the three integer buffers OpenAI's archive holds."""

    def __init__(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, int]) -> None:
        super().__init__()
        for key, value in state_dict.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, _Node())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(value.detach().half().clone(), requires_grad=False))
        for name, number in metadata.items():
            self.register_buffer(name, torch.tensor(number))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


def save_torchscript_archive(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, int] | None = None) -> Path:
    """A TorchScript archive in OpenAI's format: fp16 weights under OpenAI's keys + integer entries."""
    module = _OpenAIArchive(state_dict, OPENAI_METADATA if metadata is None else metadata).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.ones(1, dtype=torch.float16))
        torch.jit.save(traced, str(path))  # deprecated in favour of torch.export, but OpenAI's format
    return path


@dataclass
class Checkpoints:
    """The same random weights in every accepted form, plus the config that describes them."""

    directory: Path
    state_dict: dict[str, torch.Tensor]  # fp32
    config: Path  # tiny config, no quick_gelu key (exact GELU unless overridden)
    plain: Path
    nested: Path  # {"state_dict": sd}
    prefixed: Path  # "module." prefix
    archive: Path  # OpenAI TorchScript archive, fp16

    def forms(self) -> dict[str, Path]:
        return {"plain": self.plain, "nested": self.nested, "prefixed": self.prefixed, "archive": self.archive}


_CACHE: dict[str, Checkpoints] = {}


def tiny_checkpoints(tmp_path_factory) -> Checkpoints:
    """Built once per test session (shared by the parity, loading and convert tests)."""
    if "tiny" not in _CACHE:
        directory = tmp_path_factory.mktemp("tiny_clip")
        state_dict = random_openai_state_dict(seed=0)
        torch.save(state_dict, directory / "plain.pt")
        torch.save({"state_dict": state_dict, "epoch": 3}, directory / "nested.pt")
        torch.save({f"module.{key}": value for key, value in state_dict.items()}, directory / "prefixed.pt")
        _CACHE["tiny"] = Checkpoints(
            directory=directory,
            state_dict=state_dict,
            config=write_config(directory / "tiny.json"),
            plain=directory / "plain.pt",
            nested=directory / "nested.pt",
            prefixed=directory / "prefixed.pt",
            archive=save_torchscript_archive(state_dict, directory / "archive.pt"),
        )
    return _CACHE["tiny"]


def sample_images(size: int, count: int = 2, seed: int = 1) -> torch.Tensor:
    """Zero-mean images (as after CLIP's normalisation), so the embeddings depend strongly on them."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- archives for the safe reader's tests: scripted modules and crafted (hostile) archives ------------


class _ScriptedChild(nn.Module):
    """A bias-free Linear (its declared `bias` is None), int and bool buffers, and a tensor attribute
    that is neither parameter nor buffer (in data.pkl, not in state_dict())."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)
        self.register_buffer("count", torch.tensor(5))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.plain = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.plain


class _ScriptedRoot(nn.Module):
    """Dtypes and layouts beyond OpenAI's: fp64, a transposed fp16 parameter, bf16 and int32 buffers, an
    empty buffer, and a buffer that is a view into another one's storage (same storage record, offset 2)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.weight = nn.Parameter(torch.randn(4, 4, generator=generator, dtype=torch.float64))
        self.child = _ScriptedChild()
        self.transposed = nn.Parameter(torch.randn(5, 4, generator=generator).half().t())
        self.register_buffer("bf", torch.randn(3, generator=generator).bfloat16())
        self.register_buffer("ints", torch.arange(6, dtype=torch.int32).reshape(2, 3))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("window", self.ints.view(-1)[2:5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(x)


def save_scripted_archive(path: Path) -> Path:
    """A torch.jit.script archive (TorchScript's other writer) of `_ScriptedRoot`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_ScriptedRoot()), str(path))
    return path


class _SelfRestoring(nn.Module):
    """A module whose TorchScript `__setstate__` runs when torch.jit.load reads it: it doubles the weights
    (so jit.load's state dict differs from what was saved) and prints a line."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("archive code ran")
        self.weight = state[0] * 2
        self.training = state[1]


def save_self_restoring_archive(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_SelfRestoring()), str(path))
    return path


def rewrite_archive(source: Path, target: Path, change) -> Path:
    """Copy a zip record by record; `change(name, data)` returns the new bytes (None drops the record)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def archive_prefix(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()[0].split("/")[0] + "/"


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def global_call_pickle(module: str, name: str, argument: str, inside_module: bool = True) -> bytes:
    """A protocol-2 pickle that calls `module.name(argument)` (GLOBAL, MARK, argument, TUPLE, REDUCE),
    as the value of an attribute of a `__torch__` module object (as in a real data.pkl) or alone."""
    call = b"c" + f"{module}\n{name}\n".encode() + b"(" + _unicode(argument) + b"tR"
    if not inside_module:
        return b"\x80\x02" + call + b"."
    return b"\x80\x02c__torch__\nRoot\n)\x81}(" + _unicode("weight") + call + b"ub."


class MarkerPayload:
    """Pickled with `pickle.dumps`, its __reduce__ becomes `posix.system("touch <marker>")` (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_payload(marker: Path) -> tuple[bytes, bytes]:
    """Python that writes `marker` if anything executes it: a head and a tail for code records."""
    head = f"import os\nos.system('touch {marker}')\nopen({str(marker)!r}, 'a').write('ran')\n".encode()
    tail = f"\nopen({str(marker)!r}, 'a').write('ran')\n".encode()
    return head, tail
