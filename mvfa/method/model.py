"""The adapted visual encoder: a frozen CLIP ViT with residual seg/det adapters at chosen stages.

After each stage block s (1-indexed, e.g. 6 12 18 24 for ViT-L/14) two adapters read the stream x:
    seg_mid, seg_out = seg_adapter(x);  det_mid, det_out = det_adapter(x)
    x = 0.8 * x + 0.1 * seg_out + 0.1 * det_out
The `mid` outputs live in the text embedding space and are the stage's seg and det tokens.
"""
from __future__ import annotations

from collections.abc import Iterable
import copy
from dataclasses import dataclass
import hashlib
import math
from pathlib import Path
import re

import torch
from torch import nn

from CLIP.model import CLIP

from mvfa.runtime.errors import CheckpointFormatError
from mvfa.runtime.files import load_torch_data, save_torch_atomic

STREAM_KEEP = 0.8  # weight of the backbone stream after an adapter stage
ADAPTER_MIX = 0.1  # weight of each adapter's output (seg and det) added to the stream
LEAKY_SLOPE = 0.01
CHECKPOINT_KEYS = ("seg_adapters", "det_adapters")
META_NUMBERS = ("threshold", "target_fpr")  # numbers the test scripts and predict read from a checkpoint's meta
_ADAPTER_KEY = re.compile(r"^\d+\.fc[12]\.0\.weight$")


class ResidualAdapter(nn.Module):
    """Bottleneck width -> embed_dim -> width; returns (mid, out). Keys `fc1.0.weight`, `fc2.0.weight`."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU(LEAKY_SLOPE))
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU(LEAKY_SLOPE))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.fc1(x)
        return mid, self.fc2(mid)


@dataclass
class StageTokens:
    """Per-stage tokens of a batch, class token first: lists of [B, 1 + patches, embed_dim]."""

    seg: list[torch.Tensor]
    det: list[torch.Tensor]

    def patches(self) -> "StageTokens":
        """The same without the class token (what scoring uses)."""
        return StageTokens([t[:, 1:] for t in self.seg], [t[:, 1:] for t in self.det])


class AdaptedViT(nn.Module):
    """CLIP's visual tower with seg/det adapters after the blocks listed in `stages` (1-indexed).

    The CLIP weights are frozen; only `seg_adapters` and `det_adapters` train. The blocks up to the
    first stage do not depend on the adapters: `encode_prefix` runs them without autograd, and its
    output can be cached and fed to `forward_from_prefix` (`forward` does both).
    """

    def __init__(self, clip_model: CLIP, stages: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        visual = clip_model.visual
        depth = len(visual.transformer.resblocks)
        stages = [int(s) for s in stages]
        if not stages or sorted(set(stages)) != stages or stages[0] < 1 or stages[-1] > depth:
            raise ValueError(
                f"adapter stages must be increasing block numbers between 1 and {depth}, got {stages}"
            )
        self.stages = stages
        self.visual = visual.requires_grad_(False)
        width, bottleneck = visual.conv1.out_channels, visual.proj.shape[1]
        self.seg_adapters = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in stages)
        self.det_adapters = nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in stages)
        self._block_workspace: _BlockWorkspace | None = None

    def sibling(self) -> "AdaptedViT":
        """Another adapted model on this frozen backbone: the visual tower is shared (not copied), the
        adapters are its own (copies of these). Runs trained together each hold one (mvfa.method.group)."""
        other = AdaptedViT.__new__(AdaptedViT)
        nn.Module.__init__(other)
        other.stages = list(self.stages)
        other.visual = self.visual
        other.seg_adapters = copy.deepcopy(self.seg_adapters)
        other.det_adapters = copy.deepcopy(self.det_adapters)
        other._block_workspace = self._block_workspace
        return other

    def float_with_block_workspace(self) -> None:
        """Compute in fp32 while the frozen blocks keep their stored dtype (OpenAI's fp16).

        Everything but the blocks becomes fp32; the blocks run one by one through a single fp32
        workspace block that receives each block's weights just before it runs. fp16 -> fp32 is
        exact, so outputs equal those of `.float()` bit for bit, and the blocks hold half the memory
        (ViT-L: 0.6 GB less; the copies cost under 1% of a batch-8 forward on CPU). Meant for
        inference: while autograd records, each block gets fp32 copies of its own (correct, no saving).
        Blocks already in fp32 are left as they are (no workspace). Call it once the model is on its device.
        """
        blocks = self.visual.transformer.resblocks
        for name, module in self.visual.named_children():
            if name != "transformer":
                module.float()
        for name, parameter in self.visual.named_parameters(recurse=False):
            parameter.data = parameter.data.float()
        if all(p.dtype == torch.float32 for p in blocks.parameters()):
            self._block_workspace = None
            return
        shapes = [[tuple(p.shape) for p in block.parameters()] for block in blocks]
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError("float_with_block_workspace needs blocks of one shape (one workspace serves them all)")
        self._block_workspace = _BlockWorkspace(copy.deepcopy(blocks[0]).float())

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def width(self) -> int:
        """The backbone's token width (the stream the adapters read and write)."""
        return self.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        """The text-space width of the adapters' tokens (the adapters' bottleneck)."""
        return self.visual.proj.shape[1]

    @property
    def grid_size(self) -> int:
        return self.visual.grid_size

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.seg_adapters.parameters(), *self.det_adapters.parameters()]

    @property
    def depth(self) -> int:
        """The number of transformer blocks of the backbone."""
        return len(self.visual.transformer.resblocks)

    def forward_intermediates(self, images: torch.Tensor, indices: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
        """The frozen stream (no adapters) after each block numbered in `indices` (1-indexed, increasing):
        [B, 1 + patches, width] each. Autograd records as the caller's context says; blocks after the
        last index do not run."""
        numbers = [int(i) for i in indices]
        if not numbers or sorted(set(numbers)) != numbers or numbers[0] < 1 or numbers[-1] > self.depth:
            raise ValueError(f"block numbers must be increasing between 1 and {self.depth}, got {numbers}")
        x = self.visual.embed(images)
        outputs, done = [], 0
        for number in numbers:
            x = self.run_blocks(x, done, number)
            outputs.append(x)
            done = number
        return outputs

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The frozen blocks start+1 .. stop (1-indexed; a slice [start, stop) of the blocks) over the stream x."""
        for block in self.visual.transformer.resblocks[start:stop]:
            x = self._run_block(block, x)
        return x

    @torch.no_grad()
    def encode_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Stream after block `stages[0]`, before its adapters: [B, 1 + patches, width]."""
        return self.forward_intermediates(images, self.stages[:1])[0]

    def forward_from_prefix(self, x: torch.Tensor) -> StageTokens:
        seg_tokens, det_tokens = [], []
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = self.run_blocks(x, self.stages[index - 1], stage)
            seg_mid, seg_out = self.seg_adapters[index](x)
            det_mid, det_out = self.det_adapters[index](x)
            x = STREAM_KEEP * x + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
            seg_tokens.append(seg_mid)
            det_tokens.append(det_mid)
        return StageTokens(seg_tokens, det_tokens)

    def forward(self, images: torch.Tensor) -> StageTokens:
        return self.forward_from_prefix(self.encode_prefix(images))

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._block_workspace is None:
            return block(x)
        return self._block_workspace.run(block, x)

    def fingerprint(self) -> str:
        """sha256 of the visual tower's and the adapters' weights as fp32 (the same whatever dtype the
        frozen blocks are stored in): what a saved memory bank was computed with."""
        digest = hashlib.sha256()
        hash_tensors(digest, self.visual.state_dict().items())
        for name in CHECKPOINT_KEYS:
            hash_tensors(digest, ((f"{name}.{k}", v) for k, v in getattr(self, name).state_dict().items()))
        return digest.hexdigest()

    # Checkpoints in the release's format: {"seg_adapters": state_dict, "det_adapters": state_dict}.
    def adapter_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "seg_adapters": {k: v.detach().cpu().clone() for k, v in self.seg_adapters.state_dict().items()},
            "det_adapters": {k: v.detach().cpu().clone() for k, v in self.det_adapters.state_dict().items()},
        }

    def load_adapter_state(self, state: dict, source: str = "adapter checkpoint") -> None:
        """Load {"seg_adapters": ..., "det_adapters": ...}; a malformed or unfitting state raises a
        one-line CheckpointFormatError naming `source` and the entry at fault (nothing is loaded then)."""
        check_adapter_groups(state, source)
        for name in CHECKPOINT_KEYS:
            expected = getattr(self, name).state_dict()
            found = state[name]
            for key, tensor in expected.items():
                if key not in found:
                    raise CheckpointFormatError(
                        f"{source} does not fit this model: {name}.{key} is missing "
                        f"(the model has {len(self.stages)} stages; pass the --features_list it was trained with)"
                    )
                if tuple(found[key].shape) != tuple(tensor.shape):
                    raise CheckpointFormatError(
                        f"{source} does not fit this model: {name}.{key} has shape {tuple(found[key].shape)} "
                        f"in the checkpoint, {tuple(tensor.shape)} in the model (another backbone?)"
                    )
            extra = sorted(set(found) - set(expected))
            if extra and not _ADAPTER_KEY.match(extra[0]):
                raise CheckpointFormatError(
                    f"{source}: unexpected entry {name}.{extra[0]} (adapter weights are named like '0.fc1.0.weight')"
                )
            if extra:
                raise CheckpointFormatError(
                    f"{source} does not fit this model: unexpected {name}.{extra[0]} "
                    f"(the checkpoint has more stages than --features_list {' '.join(map(str, self.stages))})"
                )
        for name in CHECKPOINT_KEYS:
            getattr(self, name).load_state_dict({k: v.to(torch.float32) for k, v in state[name].items()})


def hash_tensors(digest, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed a hashlib digest each name and the tensor's C-contiguous fp32 bytes, read from the tensor's
    own buffer when it is already a contiguous fp32 CPU tensor (otherwise converted one at a time)."""
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())


class _BlockWorkspace:
    """One fp32 block that runs the stored (e.g. fp16) blocks in turn: see AdaptedViT.float_with_block_workspace.
    A plain object, not a submodule, so it stays out of the model's parameters and state_dict."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block.requires_grad_(False)
        self.weights = list(block.parameters())

    def run(self, stored: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the backward pass would read weights the next block has overwritten
            weights = {name: p.to(torch.float32) for name, p in stored.named_parameters()}
            return torch.func.functional_call(self.block, weights, (x,))
        with torch.no_grad():
            for workspace, weight in zip(self.weights, stored.parameters()):
                workspace.copy_(weight)
        return self.block(x)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    save_torch_atomic(state, path)


def check_adapter_groups(state, source: str | Path) -> None:
    """The structure of an adapter state: a dict whose `seg_adapters` and `det_adapters` are dicts of
    floating-point tensors under string keys; otherwise a one-line CheckpointFormatError."""
    if not isinstance(state, dict):
        raise CheckpointFormatError(
            f"{source} holds a {type(state).__name__}, not an adapter checkpoint dict {{'seg_adapters': ..., 'det_adapters': ...}}"
        )
    for name in CHECKPOINT_KEYS:
        if name not in state:
            raise CheckpointFormatError(f"{source} has no {name!r} entry (found {sorted(map(str, state))[:5]})")
        group = state[name]
        if not isinstance(group, dict):
            raise CheckpointFormatError(
                f"{source}: {name} is a {type(group).__name__}, expected a dict of adapter weights ('0.fc1.0.weight': tensor, ...)"
            )
        for key, value in group.items():
            if not isinstance(key, str):
                raise CheckpointFormatError(f"{source}: {name} has the key {key!r} ({type(key).__name__}), expected names like '0.fc1.0.weight'")
            if not torch.is_tensor(value):
                raise CheckpointFormatError(f"{source}: {name}.{key} is a {type(value).__name__}, not a tensor")
            if not value.is_floating_point():
                raise CheckpointFormatError(f"{source}: {name}.{key} has dtype {value.dtype}, expected floating-point weights")


def read_checkpoint(path: str | Path) -> dict:
    """Load an adapter checkpoint as data (`weights_only=True`) and check it: the structure
    (check_adapter_groups), no other top-level entry than `meta`, finite weights, and a `meta` dict whose
    `threshold` and `target_fpr` are finite numbers when present. Each problem is a one-line
    CheckpointFormatError naming the file. (Whether it fits the model: AdaptedViT.load_adapter_state.)"""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"adapter checkpoint not found: {path}")
    state = load_torch_data(path, "adapter checkpoint", CheckpointFormatError)
    check_adapter_groups(state, path)
    unknown = sorted(str(key) for key in state if key not in (*CHECKPOINT_KEYS, "meta"))
    if unknown:
        raise CheckpointFormatError(
            f"{path}: unexpected top-level entry {unknown[0]!r} (an adapter checkpoint holds 'seg_adapters', "
            "'det_adapters' and optionally 'meta')"
        )
    for name in CHECKPOINT_KEYS:
        for key, value in state[name].items():
            if not torch.isfinite(value).all():
                raise CheckpointFormatError(f"{path}: {name}.{key} holds NaN or infinite values (a diverged training run?)")
    meta = state.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path}: 'meta' is a {type(meta).__name__}, expected a dict")
    for field in META_NUMBERS:
        value = (meta or {}).get(field)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise CheckpointFormatError(f"{path}: meta[{field!r}] is {str(value)[:40]!r} ({type(value).__name__}), expected a finite number")
    return state
