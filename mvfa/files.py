"""Files written whole or not at all (a temporary file beside the target, renamed onto it at the end),
and torch files read as data with a one-line error."""
from __future__ import annotations

import os
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
