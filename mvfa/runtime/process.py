"""What the commands share about the process they run in: the device and precision they default to,
the cache folder flag's rule, the errors they report as one line, and the launcher of a run.

This module imports no torch at import time: the commands parse their flags (and answer --help)
before torch is loaded; the functions that need it import it when called.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import sys
import traceback
from typing import TYPE_CHECKING

from CLIP.errors import CLIPError
from dataset.errors import DatasetError

from mvfa.runtime.errors import MVFAError

if TYPE_CHECKING:
    import torch

    from mvfa.runtime.distributed import Dist

USER_ERRORS = (CLIPError, DatasetError, MVFAError)  # a command prints these as one line `error: ...`, exit 2
INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
NO_CACHE = "none"  # --cache_dir none: no text-feature cache


def default_device() -> str:
    """A command's device without --device: "cuda" when a CUDA device is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(requested: str | None) -> torch.device:
    """The device of --device (None: default_device()); a malformed or unavailable one is a user error."""
    import torch

    if requested is None:
        return torch.device(default_device())
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MVFAError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MVFAError(f"--device {requested} was asked for, but no CUDA device is available: use --device cpu")
    return device


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """--precision, else fp16 on CUDA and fp32 elsewhere."""
    return requested or ("fp16" if device.type == "cuda" else "fp32")


def resolve_cache_dir(flag: str | None) -> Path | None:
    """--cache_dir: "none" turns the text-feature cache off (None); unset is mvfa.method.text.default_cache_dir()."""
    if flag == NO_CACHE:
        return None
    if flag:
        return Path(flag)
    from mvfa.method.text import default_cache_dir

    return default_cache_dir()


def guarded(work: Callable[[Dist, str | None], None], device: str | None, timeout_s: float, backend: str | None = None) -> int:
    """Run `work(dist, device)` inside the process group (none outside torchrun); the exit code.

    A user error prints one line `error: ...` and gives 2. With several ranks any failure ends this
    process at once, before the process group's teardown (mvfa.runtime.distributed.fail), so that no rank
    waits for it in a collective.
    """
    from mvfa.runtime.distributed import fail, process_group

    try:
        with process_group(device, timeout_s, backend) as (dist, rank_device):
            try:
                work(dist, rank_device)
            except USER_ERRORS as err:
                if dist.active:
                    fail(dist, f"error: {one_line(err)}", 2)
                raise
            except BaseException:
                if dist.active:
                    fail(dist, traceback.format_exc(), 1)
                raise
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written whole or not at all: nothing half-written remains
        print("error: interrupted: files of this run being written were discarded; earlier results are intact",
              file=sys.stderr)
        return INTERRUPTED
    return 0


def one_line(err: Exception) -> str:
    """The user error's message; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): its
    last line holds the message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
