"""The release's random draws, replayed on private generators.

The release seeds the global torch, numpy and Python generators with `--seed`, then draws from them
in a fixed order (../shared/METHOD.md, "Seeded replay"):
1. two random initialisations of the whole CLIP model before the OpenAI weights replace them
   (build A at the weights' own grid, build B at `--img_size`);
2. the adapters' default Linear init: every seg adapter in stage order, then every det adapter,
   each fc1 then fc2;
3. per DataLoader pass one int64 (the workers' base seed), and for a shuffling loader one more int64
   that seeds the private generator whose `randperm(n)` is the pass's order;
4. zero-shot only: Python's `random` shuffles each source's file listing and then the list of batches.

`ReleaseRandom` owns a torch generator and a `random.Random` seeded like the release's global ones and
makes the same draws on them, so a run replays the release's initial adapters and epoch orders
without touching any global generator. Step 1 needs only the kind and count of each draw: the
builds are emulated by drawing into one reusable throwaway buffer, never by allocating the models.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
import os
from pathlib import Path
import random

import torch
from torch import nn

from CLIP.config import CLIPConfig

THROWAWAY_FLOATS = 1 << 20  # the reusable draw buffer: 4 MiB of float32
NORMAL_BLOCK = 16  # torch's CPU normal_ turns uniforms into normals 16 at a time (tensors of >= 16 elements)
LINEAR_INIT_SLOPE = math.sqrt(5)  # nn.Linear's default init: kaiming_uniform_(a=sqrt(5))
# zero-shot: the release visits the source datasets in this order (other datasets follow, sorted)
RELEASE_SOURCE_ORDER = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")
UNIFORM, NORMAL = "uniform", "normal"


@dataclass(frozen=True)
class BuildSizes:
    """The sizes that decide how much one random CLIP initialisation draws."""

    vision_width: int
    vision_layers: int
    vision_mlp: int  # hidden width of a vision block's MLP
    patch: int
    grid: int  # positional grid side of this build
    embed: int
    text_width: int
    text_layers: int
    text_mlp: int
    context: int
    vocab: int

    @classmethod
    def of(cls, config: CLIPConfig, grid: int) -> "BuildSizes":
        vision, text = config.vision, config.text
        return cls(
            vision.width, vision.layers, int(vision.width * vision.mlp_ratio), vision.patch_size, grid,
            config.embed_dim, text.width, text.layers, int(text.width * text.mlp_ratio),
            text.context_length, text.vocab_size,
        )


def _block_uniforms(width: int, mlp: int) -> int:
    """A residual block's default inits (all uniform): out projection weight and bias, the packed
    in-projection, MLP c_fc weight and bias, c_proj weight and bias."""
    return width * width + width + 3 * width * width + mlp * width + mlp + width * mlp + width


def clip_build_draws(sizes: BuildSizes) -> list[tuple[str, int]]:
    """(kind, element count) of every draw of one random CLIP initialisation, in order."""
    v, t = sizes.vision_width, sizes.text_width
    draws = [
        (UNIFORM, v * 3 * sizes.patch * sizes.patch),  # conv1
        (NORMAL, v),  # class embedding
        (NORMAL, (sizes.grid**2 + 1) * v),  # positional embedding
        *[(UNIFORM, _block_uniforms(v, sizes.vision_mlp))] * sizes.vision_layers,
        (NORMAL, v * sizes.embed),  # visual projection
        (NORMAL, sizes.vocab * t),  # the token embedding module's own init
        *[(UNIFORM, _block_uniforms(t, sizes.text_mlp))] * sizes.text_layers,
        # the text tower's explicit init pass
        (NORMAL, sizes.vocab * t),
        (NORMAL, sizes.context * t),
    ]
    for _ in range(sizes.text_layers):
        draws += [(NORMAL, 3 * t * t), (NORMAL, t * t), (NORMAL, sizes.text_mlp * t), (NORMAL, t * sizes.text_mlp)]
    draws.append((NORMAL, t * sizes.embed))  # text projection
    return draws


def listing_of(order: str, listings: dict[str, list[str]] | None, data_path: Path) -> Callable[[Path], list[str]]:
    """How a zero-shot run lists an image folder: `release` as the file system does (os.listdir, the
    release's unsorted order), `sorted` by name; a recorded `listings` map (folder relative to
    `data_path` -> names) replaces the file system's listing where it has the folder."""
    def listing(folder: Path) -> list[str]:
        if listings is not None:
            key = Path(folder).resolve().relative_to(Path(data_path).resolve()).as_posix()
            if key in listings:
                return list(listings[key])
        names = os.listdir(folder)
        return sorted(names) if order == "sorted" else names

    return listing


class ReleaseRandom:
    """The release's generators for one seed: `torch` (its global CPU generator) and `python` (random)."""

    def __init__(self, seed: int, buffer_floats: int = THROWAWAY_FLOATS) -> None:
        self.torch = torch.Generator().manual_seed(seed)
        self.python = random.Random(seed)
        self.buffer_floats = buffer_floats  # the size of the buffer that skipped draws go to
        self._buffer: torch.Tensor | None = None
        self.passes: list[dict] = []  # every shuffled pass drawn: {"n": items, "order": [...]}

    def fork(self) -> "ReleaseRandom":
        """Another ReleaseRandom in this one's state (from here on, their draws are the same and independent)."""
        other = ReleaseRandom.__new__(ReleaseRandom)
        other.torch = torch.Generator().set_state(self.torch.get_state())
        other.python = random.Random()
        other.python.setstate(self.python.getstate())
        other.buffer_floats, other._buffer, other.passes = self.buffer_floats, None, list(self.passes)
        return other

    # ---- before training
    def skip_clip_builds(self, config: CLIPConfig, img_size: int) -> None:
        """The draws of the release's two random CLIP initialisations: build A at the weights' grid
        (the config's training grid), build B at `img_size`."""
        for grid in (config.vision.grid_size, img_size // config.vision.patch_size):
            for kind, count in clip_build_draws(BuildSizes.of(config, grid)):
                self._skip(kind, count)

    def init_adapters(self, seg_adapters: nn.ModuleList, det_adapters: nn.ModuleList) -> None:
        """nn.Linear's default init of every adapter weight, in the release's construction order."""
        with torch.no_grad():
            for adapters in (seg_adapters, det_adapters):
                for adapter in adapters:
                    for linear in (adapter.fc1[0], adapter.fc2[0]):
                        nn.init.kaiming_uniform_(linear.weight, a=LINEAR_INIT_SLOPE, generator=self.torch)

    # ---- DataLoader passes
    def loader_pass(self) -> None:
        """A pass of a loader that does not shuffle: its workers' base seed."""
        self._int64()

    def shuffled_pass(self, count: int) -> list[int]:
        """A pass of a shuffling loader over `count` items: base seed, sampler seed, the order."""
        self._int64()
        sampler = torch.Generator().manual_seed(self._int64())
        order = torch.randperm(count, generator=sampler).tolist()
        self.passes.append({"n": count, "order": order})
        return order

    # ---- zero-shot epochs (Python's random)
    def zero_shot_batches(self, sources: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
        """The release's epoch list: each source's items (in listing order) shuffled and cut into
        batches, sources concatenated, then the batch list shuffled."""
        batches: list[list[int]] = []
        for items in sources:
            items = list(items)
            self.python.shuffle(items)
            batches += [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        self.python.shuffle(batches)
        return batches

    # ---- draws
    def _int64(self) -> int:
        return int(torch.empty((), dtype=torch.int64).random_(generator=self.torch).item())

    def _skip(self, kind: str, count: int) -> None:
        """Advance the generator as a float32 draw of `count` elements would."""
        if kind == NORMAL and count < NORMAL_BLOCK:
            torch.empty(count).normal_(generator=self.torch)  # the scalar path: draw it as it is
            return
        if kind == NORMAL and count % NORMAL_BLOCK:
            # the vectorised path draws one uniform per element, then redraws the last block of 16
            # when the count is not a multiple of it
            count += NORMAL_BLOCK
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_floats)
        while count > 0:
            part = min(count, self.buffer_floats)
            self._buffer[:part].uniform_(generator=self.torch)
            count -= part
