"""Files written whole or not at all (a temporary file beside the target, renamed onto it at the end),
and torch files read as data with a one-line error."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _default_file_mode() -> int:
    """0o666 less the process umask: what a plainly created file would get (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, newline="")


def save_torch_atomic(obj, path: str | Path) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def load_torch_data(path: str | Path, what: str, error: type[Exception], shown: str | None = None):
    """`torch.load(path, weights_only=True)` on the CPU; a file torch cannot read raises
    `error("<shown> is not a readable <what> (<the first line of torch's message>)")` (shown: the path)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise error(f"{shown or path} is not a readable {what} ({first_line[:200]})") from None


# mkstemp / mkdtemp names made by atomic_target and by folders written whole: ".<target name>.<8 random>.tmp"
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temporary_target(name: str) -> str | None:
    """The target file or folder name of a temporary ".<target>.<8 random>.tmp" name; None for other names."""
    match = _TEMPORARY_NAME.match(name)
    return match.group("target") if match else None


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Remove the temporaries that interrupted whole-or-nothing writes left in `folder` (files of
    `atomic_target`, folders staged for a rename), those of `target` only when it is given.

    A write still in progress in another process would lose its temporary: call this only on a
    folder that this process alone writes (an output folder of one run at a time)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        found = temporary_target(entry.name)
        if found is None or (target is not None and found != target):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def default_folder_mode() -> int:
    """0o777 less the process umask: what a plainly created folder would get (mkdtemp gives 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask
