"""The memory bank of a few-shot run: per-stage tokens of the augmented normal support images, and its file format."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mvfa.method import scoring
from mvfa.method.model import AdaptedViT
from mvfa.method.prefix import PrefixCache, adapted_tokens
from mvfa.runtime.compute import autocast_for
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import load_torch_data, save_torch_atomic

BANK_BRANCHES = ("seg", "det")
BANK_FILE_FORMAT = "mvfa-memory-bank/1"


def bank_branch(has_masks: bool) -> str:
    """The tokens the memory map of a dataset reads: seg with pixel masks, det without."""
    return "seg" if has_masks else "det"


@dataclass
class MemoryBank:
    """Per-stage tokens (class tokens kept, as the release) of the augmented normal support images,
    stored as unit vectors (`scoring.normalize_bank`): every search then uses them as they are,
    instead of normalising the whole bank again for each evaluation batch.

    A branch that was not built (`build_memory_bank(..., branches=...)`) is None; `stages` of it
    raises MVFAError.
    """

    seg: list[torch.Tensor] | None
    det: list[torch.Tensor] | None

    def stages(self, branch: str) -> list[torch.Tensor]:
        """The per-stage bank of `branch` ("seg" or "det")."""
        if branch not in BANK_BRANCHES:
            raise ValueError(f"memory bank branch {branch!r}: use one of {', '.join(BANK_BRANCHES)}")
        stages = getattr(self, branch)
        if stages is None:
            built = [b for b in BANK_BRANCHES if getattr(self, b) is not None]
            raise MVFAError(
                f"the memory bank holds no {branch} tokens (it was built for {', '.join(built) or 'no branch'}): "
                f"scoring {'with' if branch == 'seg' else 'without'} masks needs a bank built with branches=({branch!r},)"
            )
        return stages


@torch.no_grad()
def build_memory_bank(
    model: AdaptedViT, images: torch.Tensor, batch_size: int, precision: str = "fp32", cache: PrefixCache | None = None,
    branches: tuple[str, ...] = BANK_BRANCHES,
) -> MemoryBank:
    """The memory bank of `images` (augmented normal support images), for the token `branches` asked for.

    A dataset's scoring reads one branch (`bank_branch(has_masks)`); building only that one halves
    the bank. Each stage's tokens go straight into one preallocated fp32 tensor (images x tokens per
    image rows), normalised in place: no per-batch copies and no concatenation.
    """
    unknown = [b for b in branches if b not in BANK_BRANCHES]
    if unknown or not branches:
        raise ValueError(f"memory bank branches {branches!r}: use one or both of {', '.join(BANK_BRANCHES)}")
    device = next(model.parameters()).device
    count = images.shape[0]
    per_image = model.grid_size**2 + 1  # tokens of an image, class token included
    width = model.embed_dim
    banks = {b: [torch.empty(count * per_image, width, device=device) for _ in model.stages] for b in branches}
    for index, start in enumerate(range(0, count, batch_size)):
        stop = min(start + batch_size, count)
        with autocast_for(device, precision):
            prefix = cache.batch(index) if cache is not None else None
            tokens = adapted_tokens(model, None if prefix is not None else images[start:stop].to(device), prefix)
        for branch, stages in banks.items():
            for bank, stage_tokens in zip(stages, getattr(tokens, branch), strict=True):
                bank[start * per_image : stop * per_image].copy_(stage_tokens.flatten(0, 1))  # fp16 -> fp32 as .float()
        del tokens
    for stages in banks.values():
        for bank in stages:
            scoring.normalize_bank_(bank)
    return MemoryBank(banks.get("seg"), banks.get("det"))


def _short(value):
    """A fingerprint's first 12 characters, other values as they are (for one-line errors)."""
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else value


def save_memory_bank(bank: MemoryBank, branch: str, identity: dict, path: str | Path) -> None:
    """Write one branch of a memory bank, with the `identity` it was computed under (weights
    fingerprint, sizes, precision: plain data), whole or not at all."""
    state = {"format": BANK_FILE_FORMAT, "identity": identity, "branch": branch,
             "stages": [t.detach().cpu() for t in bank.stages(branch)]}
    save_torch_atomic(state, path)


def check_bank_file(path: str | Path, flag: str = "--bank") -> Path:
    """`path` as a Path when it is a file; else the one-line error that says how to write one."""
    path = Path(path)
    if not path.is_file():
        raise MVFAError(f"{flag} {path} not found: write one with --support FOLDER --save_bank {path}")
    return path


def read_memory_bank(path: str | Path, identity: dict, device: torch.device, flag: str = "--bank") -> MemoryBank:
    """A bank written by `save_memory_bank`, checked against the `identity` of the model that will use
    it: a bank of other weights, sizes or precision would give other scores, so it is an error."""
    path = check_bank_file(path, flag)
    state = load_torch_data(path, "memory bank", MVFAError, shown=f"{flag} {path}")
    if not isinstance(state, dict) or state.get("format") != BANK_FILE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise MVFAError(f"{flag} {path} is not a memory bank file (format {found!r}, expected {BANK_FILE_FORMAT!r})")
    stored = state.get("identity", {})
    for key, value in identity.items():
        if stored.get(key) != value:
            raise MVFAError(
                f"{flag} {path} does not match this run: its {key} is {_short(stored.get(key))}, this run's "
                f"{_short(value)}; rebuild it with --support FOLDER --save_bank"
            )
    stages = [t.to(device) for t in state["stages"]]
    return MemoryBank(**{b: (stages if b == state["branch"] else None) for b in BANK_BRANCHES})
