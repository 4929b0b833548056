"""OpenAI's TorchScript archive read as data: the same state dict as `torch.jit.load(path).state_dict()`
(the trusted reference, used only here), and nothing of a hostile archive is ever run, under any name."""
from __future__ import annotations

import ast
from pathlib import Path
import pickle
import re
import shutil
import struct
import warnings
import zipfile

import pytest
import torch

from CLIP import CheckpointError, create_model
from CLIP.convert import main as convert_main
from CLIP.loading import is_torchscript_archive, read_state_dict, read_torchscript_state_dict
import clip_helpers as helpers

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAI_NAME = "ViT-L-14-336px.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; `checkpoints` is there too


def jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The trusted reference (it runs the archive's code: only for archives the tests wrote themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def assert_bitwise_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order; per tensor the same dtype, shape, strides and bytes."""
    assert list(ours) == list(reference)
    for key, tensor in ours.items():
        expected = reference[key]
        assert type(tensor) is torch.Tensor and not tensor.requires_grad, key
        assert (tensor.dtype, tensor.shape, tensor.stride()) == (expected.dtype, expected.shape, expected.stride()), key
        assert torch.equal(_bytes(tensor), _bytes(expected)), key


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


# --- parity with torch.jit.load ----------------------------------------------------------------------


def test_golden_archive_equals_jit_load(golden_dir):
    path = golden_dir / "clip_jit.pt"
    ours = read_torchscript_state_dict(path)
    assert_bitwise_same(ours, jit_state_dict(path))
    assert int(ours["context_length"]) == 77 and ours["input_resolution"].dtype == torch.int64
    weights, plain = read_state_dict(path), read_state_dict(golden_dir / "clip_state_dict.pt")
    assert set(weights) == set(plain) and all(torch.equal(weights[key], plain[key]) for key in plain)


def test_traced_test_archive_equals_jit_load(checkpoints):
    ours = read_torchscript_state_dict(checkpoints.archive)
    assert_bitwise_same(ours, jit_state_dict(checkpoints.archive))
    assert {key: int(ours[key]) for key in helpers.OPENAI_METADATA} == helpers.OPENAI_METADATA


def test_scripted_archive_equals_jit_load(tmp_path):
    """torch.jit.script's archives: a None parameter, a tensor attribute outside state_dict(), int, bool,
    bf16, fp64 and empty tensors, a transposed parameter and a view into another buffer's storage."""
    path = helpers.save_scripted_archive(tmp_path / "scripted.pt")
    ours = read_torchscript_state_dict(path)
    assert_bitwise_same(ours, jit_state_dict(path))
    assert "child.plain" not in ours and "child.lin.bias" not in ours
    assert ours["window"].storage_offset() == 2 and ours["window"].untyped_storage().data_ptr() == ours["ints"].untyped_storage().data_ptr()


# --- hostile data.pkl: refused at the first forbidden global, nothing run ------------------------------


def with_data_pkl(source: Path, target: Path, data: bytes) -> Path:
    prefix = helpers.archive_prefix(source)
    return helpers.rewrite_archive(source, target, lambda name, old: data if name == f"{prefix}data.pkl" else old)


FORBIDDEN = [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').write('ran')"),
    ("builtins", "exec", "open({marker!r}, 'w').write('ran')"),
    ("__builtin__", "eval", "open({marker!r}, 'w').write('ran')"),
    ("subprocess", "getoutput", "touch {marker}"),
    ("torch", "load", "{marker}"),
    ("torch._utils", "_rebuild_parameter", "{marker}"),
]


@pytest.mark.parametrize("inside_module", [True, False], ids=["in-a-module", "alone"])
@pytest.mark.parametrize("module, name, argument", FORBIDDEN, ids=[f"{m}.{n}" for m, n, _ in FORBIDDEN])
def test_forbidden_global_is_refused_and_not_run(checkpoints, tmp_path, module, name, argument, inside_module):
    marker = tmp_path / "marker"
    payload = helpers.global_call_pickle(module, name, argument.format(marker=str(marker)), inside_module)
    path = with_data_pkl(checkpoints.archive, tmp_path / OPENAI_NAME, payload)
    assert is_torchscript_archive(path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = helpers.one_line(err, path)
    assert f"{module}.{name}" in message and "refused, nothing run" in message
    assert not marker.exists()


def test_reduce_payload_is_refused_and_not_run(checkpoints, tmp_path):
    """pickle.dumps of an object whose __reduce__ is os.system("touch <marker>")."""
    marker = tmp_path / "marker"
    path = with_data_pkl(checkpoints.archive, tmp_path / "archive.pt", pickle.dumps(helpers.MarkerPayload(marker), protocol=2))
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=path)
    assert "system" in helpers.one_line(err, path) and not marker.exists()


# --- hostile code and other records: never run, the weights still load -------------------------------


def poison_everything_but_the_weights(source: Path, target: Path, marker: Path) -> Path:
    """Python that writes `marker` around every code record's text; a marker-writing pickle in place of
    constants.pkl, the debug pickles and the traced inputs (records the reader has no use for)."""
    head, tail = helpers.code_payload(marker)
    hostile_pickle = pickle.dumps(helpers.MarkerPayload(marker), protocol=2)

    def change(name: str, data: bytes) -> bytes:
        if "/code/" in name and name.endswith(".py"):
            return head + data + tail
        if name.endswith((".debug_pkl", "constants.pkl", "traced_inputs.pkl")):
            return hostile_pickle
        return data

    return helpers.rewrite_archive(source, target, change)


@pytest.mark.parametrize("name", [OPENAI_NAME, "weights.pt"])
def test_hostile_code_records_are_not_run_under_any_name(checkpoints, tmp_path, name, capsys):
    marker = tmp_path / "marker"
    path = poison_everything_but_the_weights(checkpoints.archive, tmp_path / name, marker)
    with zipfile.ZipFile(path) as archive:
        assert all(b"os.system" in archive.read(name) for name in archive.namelist() if name.endswith(".py"))
    assert_bitwise_same(read_torchscript_state_dict(path), jit_state_dict(checkpoints.archive))
    model = create_model(checkpoints.config, pretrained=path)
    reference = create_model(checkpoints.config, pretrained=checkpoints.archive)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())
    output = tmp_path / "converted.pt"
    assert convert_main([str(path), str(output)]) == 0
    assert set(torch.load(output, weights_only=True)) == set(checkpoints.state_dict)
    assert not marker.exists()


def test_archive_whose_classes_restore_their_own_state_is_refused(tmp_path, capsys):
    """jit.load runs such a class's __setstate__ (here: it prints and doubles the weights); the reader
    runs nothing and says why it cannot give the weights."""
    path = helpers.save_self_restoring_archive(tmp_path / "restoring.pt")
    capsys.readouterr()
    assert torch.equal(jit_state_dict(path)["weight"], torch.tensor([0.0, 2.0, 4.0]))  # saved as [0, 1, 2]
    assert "archive code ran" in capsys.readouterr().out
    renamed = shutil.copy(path, tmp_path / OPENAI_NAME)
    for candidate in (path, Path(renamed)):
        with pytest.raises(CheckpointError) as err:
            read_torchscript_state_dict(candidate)
        assert "__setstate__" in helpers.one_line(err, candidate)
    assert capsys.readouterr().out == ""


# --- corrupt archives: one line -------------------------------------------------------------------------


def corrupt_record_bytes(source: Path, target: Path) -> Path:
    """Flip bytes inside a storage record, leaving the zip's recorded CRC as it was."""
    shutil.copy(source, target)
    with zipfile.ZipFile(target) as archive:
        info = archive.getinfo(f"{helpers.archive_prefix(target)}data/0")
    data = bytearray(target.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
    start = info.header_offset + 30 + name_length + extra_length
    data[start : start + 4] = bytes(255 - b for b in data[start : start + 4])
    target.write_bytes(bytes(data))
    return target


def test_corrupt_and_malformed_archives_give_one_line(checkpoints, tmp_path):
    source, prefix = checkpoints.archive, helpers.archive_prefix(checkpoints.archive)
    with zipfile.ZipFile(source) as archive:
        data_pkl = archive.read(f"{prefix}data.pkl")
    cases = {
        "crc": (corrupt_record_bytes(source, tmp_path / "crc.pt"), "Bad CRC-32"),
        "short-record": (helpers.rewrite_archive(
            source, tmp_path / "short.pt", lambda n, d: d[:-2] if n == f"{prefix}data/0" else d), "holds"),
        "missing-record": (helpers.rewrite_archive(
            source, tmp_path / "missing.pt", lambda n, d: None if n == f"{prefix}data/1" else d), "is missing"),
        "no-data.pkl": (helpers.rewrite_archive(
            source, tmp_path / "nodata.pt", lambda n, d: None if n.endswith("data.pkl") else d), "data.pkl"),
        "truncated-pickle": (with_data_pkl(source, tmp_path / "cut.pt", data_pkl[:500]), "not a readable"),
        "not-a-module": (with_data_pkl(source, tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2)), "not a TorchScript module"),
        "no-declarations": (helpers.rewrite_archive(
            source, tmp_path / "nodecl.pt",
            lambda n, d: re.sub(rb"\n\s*__parameters__ = \[.*\]", b"", d) if n.endswith(".py") else d),
            "not a TorchScript module"),
    }
    for case, (path, expected) in cases.items():
        assert is_torchscript_archive(path), case
        with pytest.raises(CheckpointError, match=re.escape(expected)) as err:
            read_state_dict(path)
        helpers.one_line(err, path)


def test_views_outside_their_storage_are_refused(checkpoints, tmp_path):
    """A tensor whose size reaches past its storage record (a crafted size in data.pkl)."""
    prefix = helpers.archive_prefix(checkpoints.archive)
    original = zipfile.ZipFile(checkpoints.archive).read(f"{prefix}data.pkl")
    # the first tensor is positional_embedding [77, 64]: make it [78, 64] (BININT1 77 -> 78)
    crafted = original.replace(b"(K\x4dK\x40t", b"(K\x4eK\x40t", 1)
    assert crafted != original
    path = with_data_pkl(checkpoints.archive, tmp_path / "big.pt", crafted)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "reaches element" in helpers.one_line(err, path)


# --- the command lines that load CLIP weights ----------------------------------------------------------


def test_convert_refuses_a_hostile_archive_in_one_line(checkpoints, tmp_path, capsys):
    marker = tmp_path / "marker"
    path = with_data_pkl(checkpoints.archive, tmp_path / OPENAI_NAME,
                         helpers.global_call_pickle("os", "system", f"touch {marker}"))
    output = tmp_path / "out.pt"
    assert convert_main([str(path), str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert str(path) in captured.err and "os.system" in captured.err and "Traceback" not in captured.err
    assert not marker.exists() and not output.exists()


def test_test_zero_refuses_a_hostile_archive_in_one_line(synthetic_data, tiny_clip, tmp_path, capsys):
    from mvfa import cli
    from tests.scripts_helpers import tiny_argv

    data = synthetic_data  # conftest.py: read only
    marker = tmp_path / "marker"
    tiny = helpers.save_torchscript_archive(torch.load(tiny_clip, weights_only=True), tmp_path / "tiny_archive.pt")
    path = with_data_pkl(tiny, tmp_path / OPENAI_NAME, helpers.global_call_pickle("builtins", "eval", f"open({str(marker)!r}, 'w')"))
    from mvfa.method.model import AdaptedViT, save_checkpoint
    from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

    adapters = tmp_path / "adapters.pth"  # test_zero reads its adapters before the CLIP weights
    save_checkpoint(AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES]).adapter_state(), adapters)
    argv = tiny_argv(data, path, tmp_path / "ckpt", tmp_path / "out", "Liver", "--cache_dir", "none", "--checkpoint", str(adapters))
    assert cli.main_test_zero(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "builtins.eval" in err and str(path) in err
    assert "Traceback" not in err and not marker.exists()


# --- no code-running loader in the library -------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def code_running_loaders(file: Path) -> list[str]:
    """Calls of torch.jit.load, pickle/marshal/dill loads, torch.load without weights_only=True, and
    Unpickler subclasses other than the archive reader's (by the syntax tree: prose in docstrings is fine)."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        where = f"{file.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            bare = isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec"}
            if bare or name.endswith("jit.load") or name in {"pickle.load", "pickle.loads", "marshal.loads", "dill.load", "dill.loads"}:
                found.append(f"{where}: {name}")
            if name == "torch.load":
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
        if isinstance(node, ast.ClassDef) and any("Unpickler" in _dotted(base) for base in node.bases):
            if (file.name, node.name) != ("loading.py", "_ArchiveUnpickler"):
                found.append(f"{where}: class {node.name}")
    return found


def test_library_code_has_no_code_running_loader():
    files = [file for folder in ("CLIP", "mvfa", "dataset") for file in sorted((REPO_ROOT / folder).rglob("*.py"))]
    files += sorted(REPO_ROOT.glob("*.py"))
    assert len(files) > 20
    assert [line for file in files for line in code_running_loaders(file)] == []


def test_the_archive_unpickler_knows_a_fixed_table_of_globals():
    """find_class: the tensor rebuild, the storage dtypes, OrderedDict and __torch__ placeholders; nothing is imported."""
    from CLIP.loading import _ArchiveError, _ArchiveUnpickler, _ScriptObject, _StorageType

    import io

    unpickler = _ArchiveUnpickler(io.BytesIO(b""), None, "x/")
    assert isinstance(unpickler.find_class("torch", "HalfStorage"), _StorageType)
    assert issubclass(unpickler.find_class("__torch__.clip.model", "CLIP"), _ScriptObject)
    assert unpickler.find_class("collections", "OrderedDict").__module__ == "collections"
    for module, name in [("torch", "Tensor"), ("torch._utils", "_rebuild_tensor"), ("collections", "namedtuple"),
                         ("numpy", "array"), ("copyreg", "_reconstructor"), ("torch.jit", "load")]:
        with pytest.raises(_ArchiveError):
            unpickler.find_class(module, name)


def test_a_state_given_to_a_storage_or_a_tensor_is_refused(checkpoints, tmp_path):
    """BUILD on what persistent_load or the tensor rebuild returned (a real data.pkl never does that)."""
    numel = b"M\x40\x13"  # record data/0 holds 77 x 64 = 4928 fp16 elements
    storage = b"(X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + numel + b"tQ"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00" + numel + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
    cases = {
        "storage": (storage + b"}X\x04\x00\x00\x00flatK\x01sb", "gives storage 0 a state"),
        "tensor": (tensor + b"\x88NN\x87b", "positional_embedding carries autograd state"),  # Tensor.__setstate__
    }
    for case, (value, expected) in cases.items():  # the archive's root class, its first declared parameter
        data = b"\x80\x02c__torch__.clip_helpers\n_OpenAIArchive\n)\x81}(" + helpers._unicode("positional_embedding") + value + b"ub."
        path = with_data_pkl(checkpoints.archive, tmp_path / f"{case}.pt", data)
        with pytest.raises(CheckpointError) as err:
            read_torchscript_state_dict(path)
        assert expected in helpers.one_line(err, path)


def test_typed_list_helpers_pass_their_value_through():
    """TorchScript's pickler writes typed lists as torch.jit._pickle.build_intlist([...]) etc."""
    import io

    from CLIP.loading import _ArchiveUnpickler

    data = b"\x80\x02ctorch.jit._pickle\nbuild_intlist\n](K\x01K\x02e\x85Rctorch.jit._pickle\nrestore_type_tag\n(}" + \
        helpers._unicode("Dict[str, int]") + b"tR\x86."
    assert _ArchiveUnpickler(io.BytesIO(data), None, "x/").load() == ([1, 2], {})
