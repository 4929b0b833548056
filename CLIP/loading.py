"""Checkpoint forms -> one plain fp32 state dict; architecture inference and checks.

Accepted forms of OpenAI CLIP weights:
- OpenAI's TorchScript archive (e.g. `ViT-L-14-336px.pt`, fp16, with the integer entries
  `input_resolution`, `context_length`, `vocab_size`), read as data by `read_torchscript_state_dict`;
- a plain state dict, a dict holding it under `state_dict`, keys with a `module.` prefix;
  these load with `torch.load(weights_only=True)`.

A checkpoint is data, not code: nothing in a weights file is ever run, whatever its name or sha256.

OpenAI's TorchScript archive, and why reading it runs nothing
-------------------------------------------------------------
The archive is a zip file whose records all sit under one folder `<archive>/`:
- `data.pkl`: a pickle of the module tree. Each module is an object of a TorchScript class
  (`GLOBAL __torch__.<module path> <class>`, NEWOBJ, then BUILD with a dict of its attributes:
  parameters, buffers, submodules, `training`, ...). Each tensor is
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`, where the
  storage is a persistent id `("storage", torch.<Dtype>Storage, key, location, numel)`;
- `data/<key>`: the raw bytes of that storage (`numel` elements, the byte order in `byteorder`);
- `code/<module path>.py`: the TorchScript source of the classes. Each module class declares its
  parameters and buffers on two lines, `__parameters__ = ["weight", "bias", ]` and `__buffers__ = [...]`;
  its other tensor attributes are not part of `state_dict()`;
- `constants.pkl`, `constants/`, `version`, `byteorder`, `.data/serialization_id`, debug records.

`torch.jit.load` compiles the code and runs it (e.g. a class's `__setstate__`); an unrestricted
pickle would call whatever global the pickle names. Here the pickle goes through `_ArchiveUnpickler`,
whose `find_class` is a fixed table: `_rebuild_tensor_v2` (mapped to our own `_rebuild_tensor`, which
checks the view against its storage), the storage dtype names (mapped to dtypes),
`collections.OrderedDict`, TorchScript's typed-list and type-tag helpers of `torch.jit._pickle`
(mapped to functions that return their first argument), and every `__torch__.*` class, mapped to
`_ScriptObject`, an inert placeholder that records the state it is given. Any other global is refused
(nothing is imported).
`persistent_load` reads the storage bytes from the zip record into a tensor of the named dtype.
The code records are read as text only, for the two declaration lines (`ast.literal_eval` of a list
of strings); a class that defines `__setstate__` would need its code run to restore its state, so
such an archive is refused. The state dict is then collected as `torch.jit.load(path).state_dict()`
orders it: per module its parameters, its buffers, then its submodules (None values skipped).
"""
from __future__ import annotations

import ast
import collections
import hashlib
import math
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig
from .errors import CheckpointError
from .model import resample_positional_embedding

# Entries of OpenAI's archive that are hyper-parameters, not weights.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder and `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.startswith("code/") for name in names) and any(
        name.endswith("constants.pkl") for name in names
    )


# --- OpenAI's TorchScript archive, read as data (see the module docstring) -------------------------

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_DECLARATION = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")
_CLASS_LINE = re.compile(r"^class (\w+)\b")
_STORAGE_KEY = re.compile(r"^\w+$")
# TorchScript's pickler wraps typed lists and tagged containers in these; each returns its first argument.
_PASS_THROUGH = frozenset({"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"})


class _ArchiveError(Exception):
    """What is wrong inside the archive (read_torchscript_state_dict adds the file name)."""


@dataclass(frozen=True)
class _StorageType:
    """Stands for `torch.<Dtype>Storage` in a pickle: only its dtype is used."""

    dtype: torch.dtype

    def __setstate__(self, state) -> None:  # BUILD would otherwise write into the object's __dict__
        raise _ArchiveError("its data.pkl gives a storage type a state")


@dataclass(frozen=True)
class _Storage:
    """A storage record read from `data/<key>`: its elements as a flat tensor."""

    key: str
    flat: torch.Tensor

    def __setstate__(self, state) -> None:
        raise _ArchiveError(f"its data.pkl gives storage {self.key} a state")


class _ScriptObject:
    """Stands for an object of a TorchScript class (`__torch__.*`): it records the arguments and the
    state the pickle gives it, and has no other behaviour."""

    qualified_name = ""

    def __new__(cls, *args):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """Our `_rebuild_tensor_v2`: a view of a storage record, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise _ArchiveError(f"a tensor is built from a {type(storage).__name__}, not a storage record")
    integers = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if integers is None or len(size) != len(stride) or not all(type(n) is int and n >= 0 for n in integers):
        raise _ArchiveError(f"a tensor of storage {storage.key} has a malformed offset, size or stride ({offset!r}, {size!r}, {stride!r})")
    extent = offset + sum((n - 1) * step for n, step in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage.flat.numel():
        raise _ArchiveError(f"a tensor of size {list(size)} reaches element {extent} of storage {storage.key}, which holds {storage.flat.numel()}")
    return storage.flat.as_strided(size, stride, offset)


def _first_argument(value, *_):
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` of a TorchScript archive without importing or calling anything of its choosing."""

    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(handle)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type("ScriptObject", (_ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _PASS_THROUGH:
            return _first_argument
        raise _ArchiveError(f"its data.pkl names {module}.{name}, which a weights file has no use for (refused, nothing run)")

    def persistent_load(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _ArchiveError(f"its data.pkl refers to {str(pid)[:80]!r}, not to a storage record")
        _, kind, key, _location, numel = pid
        if not (isinstance(key, str) and _STORAGE_KEY.match(key) and type(numel) is int and numel >= 0):
            raise _ArchiveError(f"malformed storage reference {str(pid)[:80]!r}")
        if key in self.storages:
            if self.storages[key].flat.dtype != kind.dtype:
                raise _ArchiveError(f"storage {key} is referred to as {kind.dtype} and as {self.storages[key].flat.dtype}")
            return self.storages[key]
        record = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(record)
        except KeyError:
            raise _ArchiveError(f"the storage record {record} is missing") from None
        size = numel * kind.dtype.itemsize
        if info.file_size != size:
            raise _ArchiveError(f"the record {record} holds {info.file_size} bytes, not the {size} of {numel} {kind.dtype} elements")
        buffer = bytearray(size)
        with self.archive.open(info) as stream:
            if stream.readinto(buffer) != size:
                raise _ArchiveError(f"the record {record} ends early")
        flat = torch.frombuffer(buffer, dtype=kind.dtype) if size else torch.empty(0, dtype=kind.dtype)
        self.storages[key] = _Storage(key, flat)
        return self.storages[key]


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """`torch.jit.load(path).state_dict()` (same keys in the same order, dtypes and bytes), read as data:
    nothing of the archive is run. Any problem is a one-line CheckpointError naming the file."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(archive)
    except _ArchiveError as err:
        raise CheckpointError(f"{path} was not loaded: {err}; use OpenAI's published file or a plain state dict") from None
    except Exception as err:  # a corrupt zip record, a malformed pickle, ...
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable CLIP checkpoint (corrupt TorchScript archive: {type(err).__name__}"
            f"{': ' + reason if reason else ''}); download it again"
        ) from None


def _read_archive(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    names = archive.namelist()
    prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
    if not prefix or f"{prefix}data.pkl" not in names:
        raise _ArchiveError("it has no <archive>/data.pkl record: not a TorchScript archive")
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != sys.byteorder.encode():
        raise _ArchiveError(f"its tensors are stored in another byte order than this machine's ({sys.byteorder})")
    with archive.open(f"{prefix}data.pkl") as handle:
        root = _ArchiveUnpickler(handle, archive, prefix).load()
    declarations = _Declarations(archive, prefix)
    if not isinstance(root, _ScriptObject) or declarations.of(root) is None:
        raise _ArchiveError(f"its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    state_dict: dict[str, torch.Tensor] = {}
    _collect(root, "", declarations, state_dict, set())
    return state_dict


class _Declarations:
    """The `__parameters__` and `__buffers__` lines of each class in the archive's code records, read as text."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        self.archive, self.prefix = archive, prefix
        self.files: dict[str, dict[str, tuple[list[str], list[str]] | None]] = {}

    def of(self, obj: _ScriptObject) -> tuple[list[str], list[str]] | None:
        """(parameters, buffers) of a module class; None for a class that is not a module."""
        module, _, name = obj.qualified_name.rpartition(".")
        if module not in self.files:
            self.files[module] = self._read(module)
        return self.files[module].get(name)

    def _read(self, module: str) -> dict[str, tuple[list[str], list[str]] | None]:
        record = f"{self.prefix}code/{module.replace('.', '/')}.py"
        try:
            text = self.archive.read(record).decode("utf-8")
        except KeyError:
            raise _ArchiveError(f"its code record {record} is missing (needed to tell parameters from other attributes)") from None
        declared: dict[str, dict[str, list[str]]] = {}  # class -> {"__parameters__": [...], "__buffers__": [...]}
        restoring: set[str] = set()  # classes that define __setstate__
        current = None
        for line in text.splitlines():
            if match := _CLASS_LINE.match(line):
                current = match.group(1)
                declared.setdefault(current, {})
            elif current is not None and (match := _DECLARATION.match(line)):
                names = ast.literal_eval(match.group(2))
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise _ArchiveError(f"{record} declares {match.group(1)} as {match.group(2)[:80]}")
                declared[current][match.group(1)] = names
            elif current is not None and line.lstrip().startswith("def __setstate__("):
                restoring.add(current)
        if restoring:
            raise _ArchiveError(
                f"class {module}.{min(restoring)} restores its state with its own code (__setstate__), which is not run"
            )
        # a module class declares its parameters (and its buffers; no line: none); other classes are not modules
        return {
            name: (lines["__parameters__"], lines.get("__buffers__", [])) if "__parameters__" in lines else None
            for name, lines in declared.items()
        }


def _collect(obj: _ScriptObject, prefix: str, declarations: _Declarations, out: dict[str, torch.Tensor], above: set[int]) -> None:
    """Add a module's parameters, then its buffers, then its submodules' entries (as Module.state_dict does)."""
    if id(obj) in above:
        raise _ArchiveError(f"module {prefix.rstrip('.')} contains itself")
    state = obj.state
    if not (isinstance(state, dict) and all(isinstance(key, str) for key in state)):
        raise _ArchiveError(f"module {prefix.rstrip('.') or 'root'} ({obj.qualified_name}) has a {type(state).__name__} state, not a dict of attributes")
    parameters, buffers = declarations.of(obj)
    for name in (*parameters, *buffers):
        if name not in state:
            raise _ArchiveError(f"{prefix}{name} is declared by {obj.qualified_name} but has no value")
        value = state[name]
        if value is None:
            continue
        if not torch.is_tensor(value):
            raise _ArchiveError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
        if value.requires_grad or getattr(value, "_backward_hooks", None):  # only a BUILD on the tensor sets these
            raise _ArchiveError(f"{prefix}{name} carries autograd state, which a weights file has no use for")
        out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and declarations.of(value) is not None:
            _collect(value, f"{prefix}{name}.", declarations, out, above | {id(obj)})


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read any accepted checkpoint form into a plain state dict (original dtypes, metadata dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint not found: {path}")
    try:
        if is_torchscript_archive(path):
            raw = read_torchscript_state_dict(path)  # one-line CheckpointError of its own
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # the weights-only unpickler also raises KeyError, IndexError, ... on junk
        raise CheckpointError(f"{path} is not a readable CLIP checkpoint ({_load_failure(err)})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path} holds no state dict (found {type(raw).__name__})")
    state_dict = {}
    for key, value in raw.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key in OPENAI_METADATA_KEYS:
            continue
        if not torch.is_tensor(value):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    for required in ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight"):
        if required not in state_dict:
            raise CheckpointError(f"{path} is not an OpenAI-style CLIP ViT checkpoint: no {required!r} entry")
    return state_dict


def _load_failure(err: Exception) -> str:
    """A short reason for a failed load (torch's messages run to paragraphs of advice)."""
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        return "not a weights-only torch checkpoint: not a torch.save file, or it holds non-tensor objects"
    if isinstance(err, EOFError):
        return "the file ends early: truncated or empty"
    if isinstance(err, (RuntimeError, OSError, ValueError)) and text:
        return text.splitlines()[0].split(". ")[0][:200]
    return f"corrupt data or not a torch checkpoint: {type(err).__name__}"


def _count_blocks(state_dict: dict[str, torch.Tensor], visual: bool) -> int:
    indices = {
        int(match.group(2))
        for key in state_dict
        if (match := _BLOCK_KEY.match(key)) and bool(match.group(1)) == visual
    }
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, torch.Tensor], name: str = "inferred") -> CLIPConfig:
    """The architecture implied by the tensor shapes (head counts use the 64-wide heads of OpenAI's ViTs)."""
    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
    text_width = state_dict["ln_final.weight"].shape[0]
    vision = VisionConfig(
        image_size=grid * patch,
        layers=_count_blocks(state_dict, visual=True),
        width=vision_width,
        patch_size=patch,
    )
    text = TextConfig(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count_blocks(state_dict, visual=False),
    )
    return CLIPConfig(embed_dim=state_dict["text_projection"].shape[1], vision=vision, text=text, name=name)


def load_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, consume: bool = False,
    keep_dtype_of: tuple[str, ...] = (),
) -> None:
    """Copy weights into `model` after resampling the positional grid to the model's input size.

    Any difference of keys or shapes is a CheckpointError naming the first offending key and both shapes;
    it is raised before any weight is touched.

    A model built on the meta device (no storage, no random initialisation) receives fp32 tensors of
    its own (`load_state_dict(assign=True)`); a materialised model has the weights copied into its
    parameters, dtype converted tensor by tensor. `consume=True` hands the dict over: its entries are
    popped as they are converted, so a half-precision checkpoint and its fp32 copy never coexist whole
    (the dict ends empty). On a meta build, keys starting with one of `keep_dtype_of` keep the
    checkpoint's dtype (e.g. "visual." in fp16 while the text features are computed; the caller
    converts them later with `.float()`, which gives the same fp32 values).
    """
    entries = state_dict if consume else dict(state_dict)
    positional = entries["visual.positional_embedding"]
    entries["visual.positional_embedding"] = resample_positional_embedding(positional.float(), model.visual.grid_size)
    del positional
    expected = model.state_dict()
    _check_entries(entries, expected, source)
    if not _on_meta(expected, source):
        model.load_state_dict(entries)
        return
    owned = {
        key: _owned_tensor(entries.pop(key), copy=not consume, keep_dtype=key.startswith(keep_dtype_of))
        for key in list(expected)
    }
    model.load_state_dict(owned, assign=True)
    _check_materialised(model, source)


def _check_materialised(model: nn.Module, source: str) -> None:
    """After a meta build, every parameter and buffer must hold data (a buffer outside the state dict would not)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    empty = [name for name, tensor in tensors if tensor.is_meta]
    if empty:
        raise CheckpointError(f"{source} left {empty[0]!r} without a value (built on the meta device, not in the state dict)")


def _check_entries(entries: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Same keys and shapes as the model's state dict, else a one-line CheckpointError."""
    for key, tensor in expected.items():
        if key not in entries:
            raise CheckpointError(f"{source} does not fit the model config: it lacks {key!r} (shape {tuple(tensor.shape)})")
        if entries[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source} does not fit the model config: {key!r} has shape {tuple(entries[key].shape)} "
                f"in the checkpoint, {tuple(tensor.shape)} in the model"
            )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source} does not fit the model config: unexpected entry {unexpected[0]!r}")


def _on_meta(expected: dict[str, torch.Tensor], source: str) -> bool:
    """Whether the model was built on the meta device (all of it; a partly built model is refused)."""
    meta = {key for key, tensor in expected.items() if tensor.is_meta}
    if meta and len(meta) != len(expected):
        raise CheckpointError(f"cannot load {source}: the model is partly on the meta device ({sorted(meta)[0]!r})")
    return bool(meta)


def _owned_tensor(value: torch.Tensor, copy: bool, keep_dtype: bool = False) -> torch.Tensor:
    """`value` contiguous and fp32 (in its own dtype when `keep_dtype`); a new one when `copy` (the
    caller keeps the original)."""
    dtype = value.dtype if keep_dtype else torch.float32
    return value.to(dtype, memory_format=torch.contiguous_format, copy=copy)
