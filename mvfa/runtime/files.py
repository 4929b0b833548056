"""Files written whole or not at all (a temporary file beside the target, renamed onto it at the end),
torch files read as data with a one-line error, and the checks and messages of paths a command writes.

The one place that renames a temporary file onto its target: every file written whole goes
through `atomic_target` (or its `write_text_atomic`, `save_torch_atomic`).
torch is imported by the functions that need it, so that light modules may use the others.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import os
from pathlib import Path
import re
import shutil
import socket
import stat
import tempfile

from mvfa.runtime.errors import MVFAError, single_line

WRITE_BITS = 0o222  # a folder without any of these is read-only, whoever runs


def writable_folder(folder: Path) -> bool:
    """True when this process may create entries in `folder`. A folder without any write bit counts as
    read-only even for root (who may write anywhere): that is what marking it read-only asks for."""
    return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & WRITE_BITS)


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (where `mkdir(parents=True)` would start)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def missing_folders(folder: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create for `folder`, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _default_file_mode() -> int:
    """0o666 less the process umask: what a plainly created file would get (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _flush_to_disk(name: str) -> None:
    handle = os.open(name, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed.

    The temporary file is flushed to disk (fsync) before the rename, so that a crash leaves the
    earlier file or the new one, never an empty one; it gets the mode a plainly created file gets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp_name)
        _flush_to_disk(tmp_name)
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str | None = None) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding=encoding, newline="")


def save_torch_atomic(obj, path: str | Path) -> None:
    import torch

    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def load_torch_data(path: str | Path, what: str, error: type[Exception], shown: str | None = None):
    """`torch.load(path, weights_only=True)` on the CPU; a file torch cannot read raises
    `error("<shown> is not a readable <what> (<the first line of torch's message>)")` (shown: the path)."""
    import torch

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


# ------------------------------------------------------------------------------------------------
# Paths a command writes: checks before any work, messages of failed writes


def file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words ("a FIFO", "a broken link", ...)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return "a broken link" if path.is_symlink() else f"unreadable ({err.strerror or err})"
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file"))
    return next((word for test, word in kinds if test(mode)), "a special file")


def os_error_text(err: OSError) -> str:
    """'cannot write <file> (<reason>)' from an OSError, on one line."""
    where = f" {err.filename}" if err.filename else ""
    return single_line(f"cannot write{where} ({err.strerror or err})")


def check_writable_file(path: Path, flag: str) -> None:
    """Before any work: `path` can be written as a file (not a folder; its folder exists or can be
    made, and accepts new files: probed with a temporary file, removed at once). One error line else."""
    if path.is_dir():
        raise MVFAError(f"{flag} {path} is a folder: pass the path of a file")
    if path.exists() and not path.is_file():
        raise MVFAError(f"{flag} {path} is {file_kind(path)}: pass the path of a regular file")
    existing = nearest_existing(Path(os.path.abspath(path.parent)))
    if not existing.is_dir():
        raise MVFAError(f"{flag} {path} cannot be written: {existing} is a file, not a folder; choose another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise MVFAError(f"{flag} {path} cannot be written ({err.strerror or err} in {existing}): "
                        "choose a folder you can write to") from None


# ------------------------------------------------------------------------------------------------
# One run at a time in a folder

LOCK_NAME = ".mvfa-run.lock"  # in a run's output folder while the run works; holds "<pid> <host>"


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid this system could have
        return False
    return True


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it cannot be read or parsed."""
    try:
        pid, host = lock.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _create_lock(lock: Path, stamp: str) -> bool:
    """Create `lock` holding `stamp`, atomically (O_EXCL): False when it exists already."""
    try:
        handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _default_file_mode())
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as stream:
        stream.write(stamp)
    return True


def _refuse_or_take_over(lock: Path, what: str, stamp: str, error: type[Exception]) -> None:
    """`lock` exists: refuse while its process may live; take over the lock of a dead process (with a note)."""
    owner = _lock_owner(lock)
    if owner is None:
        raise error(f"{what} is in use by another run ({lock} exists but names no process): "
                    f"if no run is writing there, remove {lock} and start again")
    pid, host = owner
    if host != socket.gethostname():
        raise error(f"{what} is in use by process {pid} on {host} ({lock}): wait for it to finish or choose "
                    f"another folder; if that run is over, remove {lock}")
    if _process_alive(pid):
        raise error(f"{what} is in use by another run (process {pid}, {lock}): wait for it to finish or choose "
                    "another folder")
    lock.unlink(missing_ok=True)
    if not _create_lock(lock, stamp):
        raise error(f"{what} was taken by another run just now ({lock}): wait for it to finish or choose another folder")
    print(f"note: took over {lock} from process {pid}, which is no longer running")


@contextmanager
def folder_lock(folder: str | Path, what: str, error: type[Exception], active: bool = True) -> Iterator[None]:
    """Hold `folder` for this process: one run at a time writes there.

    The folder is made when missing; a lock file (LOCK_NAME, created with O_EXCL, holding this pid and
    host) marks it taken. A live owner's lock is refused with `error` (one line naming `what`); the lock
    of a process that no longer runs (a killed run) is taken over with a note; an owner on another
    host cannot be checked, so it is refused. Owning the folder, the temporaries of interrupted writes
    in it are removed. On leaving (also on errors and Ctrl-C) the lock goes, and the folders made
    here are removed again when nothing was written in them. `active` False (torchrun ranks other
    than 0, which write nothing): nothing is done.
    """
    if not active:
        yield
        return
    folder = Path(folder)
    made = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    stamp = f"{os.getpid()} {socket.gethostname()}\n"
    try:
        if not _create_lock(lock, stamp):
            _refuse_or_take_over(lock, what, stamp, error)
        try:
            remove_stale_temporaries(folder)
            yield
        finally:
            _release_lock(lock, stamp)
    finally:
        for created in reversed(made):
            try:
                created.rmdir()  # only when empty
            except OSError:
                break


def _release_lock(lock: Path, stamp: str) -> None:
    """Remove our lock (not one another run took over after ours was removed by hand)."""
    try:
        if lock.read_text() == stamp:
            lock.unlink()
    except (OSError, UnicodeDecodeError):
        pass
