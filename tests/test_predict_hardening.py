"""mvfa.predict and mvfa.export_onnx against awkward inputs and outputs: output names, special files,
interruptions, unwritable or occupied output folders, file modes, CLIP weights from the checkpoint,
flags that contradict it, and a memory bank of another width. Untrained tiny adapters, so no
training is needed: zero-shot scoring on raw values with --threshold (few-shot for the bank)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import signal
import stat

from PIL import Image
import numpy as np
import pytest
import torch

from CLIP import create_model
from mvfa import export_onnx
from mvfa import predict
from mvfa.method.model import AdaptedViT, save_checkpoint
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

FIFO_TIMEOUT_S = 120  # a predict that opens a FIFO waits forever: fail the test instead


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip) -> dict:
    root = tmp_path_factory.mktemp("hardening")
    clip = tiny_clip  # conftest.py
    torch.manual_seed(1)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE, pretrained=clip), [int(s) for s in TINY_STAGES])
    adapters = model.adapter_state()
    meta = {"model_name": TINY_MODEL, "img_size": TINY_SIZE, "features_list": [int(s) for s in TINY_STAGES],
            "object_word": "Brain", "has_masks": True, "quick_gelu": False}
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / name)
    return {"root": root, "clip": clip, "adapters": adapters, "meta": meta, "images": images}


def checkpoint(setup: dict, path: Path, **meta) -> Path:
    """The tiny adapters with the fixture's metadata, updated by `meta` (a value None removes the key)."""
    state = dict(setup["adapters"])
    state["meta"] = {k: v for k, v in {**setup["meta"], **meta}.items() if v is not None}
    save_checkpoint(state, path)
    return path


def argv(setup: dict, ckpt: Path, input_path: Path, output_dir: Path, *extra: str, clip: bool = True) -> list[str]:
    return ["--ckpt", str(ckpt), "--input", str(input_path), "--output_dir", str(output_dir), "--device", "cpu",
            "--threshold", "1.0", *(["--clip_ckpt", str(setup["clip"])] if clip else []), *extra]


@pytest.fixture
def ckpt(setup, tmp_path) -> Path:
    return checkpoint(setup, tmp_path / "adapters.pth")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if predict or export_onnx builds a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")
    monkeypatch.setattr(predict, "build", refuse)
    monkeypatch.setattr(export_onnx, "build_adapted_model", refuse)


# ------------------------------------------------------------------------------------------------
# Output names and special files


def test_overlay_names_never_collide():
    paths = [Path(n) for n in ("A.png", "a.jpg", "a.png", "a_png.png", "a.PNG")]
    names = predict._overlay_names(paths)
    assert names == ["A_png_overlay.png", "a_jpg_overlay.png", "a_png_overlay_2.png", "a_png_png_overlay.png",
                     "a_PNG_overlay_3.png"]
    assert len({n.casefold() for n in names}) == len(names)
    assert predict._overlay_names(paths) == names  # deterministic
    assert all(predict.OVERLAY_NAME.match(n) for n in names)


def test_inputs_that_shared_a_name_get_their_own_overlays(setup, ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = (setup["images"] / "a.png").read_bytes()
    for name in ("a.png", "a_png.png"):
        (folder / name).write_bytes(source)
    Image.open(setup["images"] / "b.png").save(folder / "a.jpg")
    assert predict.main(argv(setup, ckpt, folder, tmp_path / "out")) == 0
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    overlays = [row["overlay"] for row in rows]
    assert [Path(row["path"]).name for row in rows] == ["a.jpg", "a.png", "a_png.png"]
    assert overlays == ["a_jpg_overlay.png", "a_png_overlay.png", "a_png_png_overlay.png"]
    assert all((tmp_path / "out" / name).is_file() for name in overlays)


def test_special_files_named_like_images_are_skipped(setup, ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes((setup["images"] / "a.png").read_bytes())
    os.mkfifo(folder / "pipe.png")
    (folder / "gone.png").symlink_to(tmp_path / "absent.png")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("predict opened the FIFO and waited"))
    signal.alarm(FIFO_TIMEOUT_S)
    try:
        code = predict.main(argv(setup, ckpt, folder, tmp_path / "out"))
        err = capsys.readouterr().err.splitlines()
        assert code == 0
        assert [line for line in err if "pipe.png" in line] == ["skipped pipe.png: a FIFO, not a regular file"]
        assert [line for line in err if "gone.png" in line] == ["skipped gone.png: a broken link, not a regular file"]
        assert [Path(r["path"]).name for r in read_csv(tmp_path / "out" / "predictions.csv")] == ["a.png"]
        assert predict.main(argv(setup, ckpt, folder / "pipe.png", tmp_path / "out2")) == 2
        line = one_error_line(capsys)
        assert "--input" in line and "a FIFO, not a regular file" in line
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------
# Whole or nothing


@pytest.mark.parametrize("writer", ["write_text_atomic", "save_png"])
def test_an_interrupted_run_leaves_the_earlier_results_or_none(setup, ckpt, tmp_path, capsys, monkeypatch, writer):
    out = tmp_path / "out"
    assert predict.main(argv(setup, ckpt, setup["images"], out)) == 0
    before = snapshot(out)
    assert set(before) == {"predictions.csv", "predict.json", "a_png_overlay.png", "b_png_overlay.png"}

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt
    monkeypatch.setattr(predict, writer, interrupted)
    capsys.readouterr()
    assert predict.main(argv(setup, ckpt, setup["images"], out, "--overwrite", "--threshold", "0.5")) == 130
    assert calls and "interrupted" in one_error_line(capsys)
    assert snapshot(out) == before  # the earlier complete results, untouched
    assert temporaries(tmp_path) == [] and temporaries(out) == []

    fresh = tmp_path / "fresh"
    assert predict.main(argv(setup, ckpt, setup["images"], fresh)) == 130
    capsys.readouterr()
    assert not fresh.exists() and temporaries(tmp_path) == []  # none


def test_a_failed_write_is_one_line_and_leaves_nothing(setup, ckpt, tmp_path, capsys, monkeypatch):
    def full(array, path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(predict, "save_png", full)
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "out")) == 1
    line = one_error_line(capsys)
    assert "a_png_overlay.png (No space left on device)" in line and f"--output_dir {tmp_path / 'out'}" in line
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_temporaries_of_a_killed_run_are_removed_by_the_next(setup, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.main(argv(setup, ckpt, setup["images"], out)) == 0
    (tmp_path / ".out.k1ll3d_x.tmp").mkdir()  # a staging folder
    (tmp_path / ".out.k1ll3d_x.tmp" / "a_png_overlay.png").write_bytes(b"half")
    (out / ".predictions.csv.ab_cd123.tmp").write_text("half")  # an interrupted atomic write
    (tmp_path / ".other.ab_cd123.tmp").write_text("not ours")  # another target's temporary: kept
    assert predict.main(argv(setup, ckpt, setup["images"], out, "--overwrite")) == 0
    assert temporaries(tmp_path) == [".other.ab_cd123.tmp"] and temporaries(out) == []


def test_earlier_results_are_kept_unless_overwrite(setup, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.main(argv(setup, ckpt, setup["images"], out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert predict.main(argv(setup, ckpt, setup["images"] / "a.png", out)) == 2
    line = one_error_line(capsys)
    assert f"--output_dir {out} already holds an earlier run's results (predictions.csv)" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert predict.main(argv(setup, ckpt, setup["images"] / "a.png", out, "--overwrite")) == 0
    assert set(snapshot(out)) == {"predictions.csv", "predict.json", "a_png_overlay.png"}  # the old b overlay went too

    (out / "notes.txt").write_text("mine\n")  # a file predict did not write: never deleted
    capsys.readouterr()
    assert predict.main(argv(setup, ckpt, setup["images"], out, "--overwrite")) == 2
    assert "holds files predict did not write (notes.txt)" in one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main(argv(setup, ckpt, setup["images"], empty)) == 0  # an existing empty folder is fine
    assert (empty / "predictions.csv").is_file()


def test_outputs_have_the_usual_modes(setup, ckpt, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "out")) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


# ------------------------------------------------------------------------------------------------
# Early errors: one line, exit 2, before any model is built


def test_unusable_output_dir_is_found_before_the_model(setup, ckpt, tmp_path, capsys, monkeypatch, no_model):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for output, expected in ((a_file, "is a regular file, not a folder"), (a_file / "sub", "is a file, not a folder")):
        assert predict.main(argv(setup, ckpt, setup["images"], output)) == 2
        line = one_error_line(capsys)
        assert f"--output_dir {output}" in line and expected in line, line

    # A place that refuses new files (as root, permissions do not refuse: simulated).
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as patch:
        patch.setattr(predict.tempfile, "mkdtemp", denied)
        assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "out")) == 2
        line = one_error_line(capsys)
        assert f"--output_dir {tmp_path / 'out'} cannot be written (Permission denied" in line
        assert not (tmp_path / "out").exists()

    # An existing folder that refuses writes (simulated likewise).
    with monkeypatch.context() as patch:
        (tmp_path / "locked").mkdir()
        patch.setattr(predict.os, "access", lambda *args, **kwargs: False)
        assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "locked")) == 2
        assert f"--output_dir {tmp_path / 'locked'} is read-only" in one_error_line(capsys)

    # --save_bank: a folder, or inside the output folder that is replaced whole.
    support = setup["images"]
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "o2", "--support", str(support),
                             "--save_bank", str(tmp_path))) == 2
    assert f"--save_bank {tmp_path} is a folder" in one_error_line(capsys)
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "o3", "--support", str(support),
                             "--save_bank", str(tmp_path / "o3" / "bank.pt"))) == 2
    assert "is inside --output_dir" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_read_only_output_dir(setup, ckpt, tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert predict.main(argv(setup, ckpt, setup["images"], locked)) == 2
        assert "is read-only" in one_error_line(capsys)
        assert predict.main(argv(setup, ckpt, setup["images"], locked / "out")) == 2
        assert "cannot be written" in one_error_line(capsys)
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# CLIP weights and model facts from the checkpoint


def test_clip_weights_come_from_the_checkpoint(setup, tmp_path, capsys, no_model):
    """Without --clip_ckpt: the file the metadata records; none recorded (a tiny model has no OpenAI
    file) or a recorded file that is gone: one line naming --clip_ckpt, before the model is built."""
    images = setup["images"]
    unrecorded = checkpoint(setup, tmp_path / "old.pth")
    assert predict.main(argv(setup, unrecorded, images, tmp_path / "o1", clip=False)) == 2
    line = one_error_line(capsys)
    assert "--clip_ckpt" in line and repr(TINY_MODEL) in line and "has no OpenAI weights file" in line

    gone = checkpoint(setup, tmp_path / "gone.pth", clip_ckpt=str(tmp_path / "moved.pt"))
    assert predict.main(argv(setup, gone, images, tmp_path / "o2", clip=False)) == 2
    line = one_error_line(capsys)
    assert f"trained with the CLIP weights {tmp_path / 'moved.pt'}, which is not found" in line
    assert f"pass --clip_ckpt {tmp_path / 'moved.pt'}" in line

    assert export_onnx.main(["--ckpt", str(unrecorded), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "--clip_ckpt" in one_error_line(capsys)


def test_recorded_clip_weights_are_used_and_recorded(setup, tmp_path, capsys):
    recorded = checkpoint(setup, tmp_path / "new.pth", clip_ckpt=str(setup["clip"]))
    assert predict.main(argv(setup, recorded, setup["images"], tmp_path / "out", clip=False)) == 0
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert summary["clip_ckpt"] == str(setup["clip"]) and summary["clip_ckpt_source"] == "checkpoint metadata"
    # An explicit --clip_ckpt wins over the metadata (here a copy of the same weights).
    copy = tmp_path / "copy.pt"
    copy.write_bytes(setup["clip"].read_bytes())
    assert predict.main(argv(setup, recorded, setup["images"], tmp_path / "out2", "--clip_ckpt", str(copy), clip=False)) == 0
    summary = json.loads((tmp_path / "out2" / "predict.json").read_text())
    assert summary["clip_ckpt"] == str(copy) and summary["clip_ckpt_source"] == "--clip_ckpt"
    assert read_csv(tmp_path / "out" / "predictions.csv")[0]["score"] == read_csv(tmp_path / "out2" / "predictions.csv")[0]["score"]


@pytest.mark.parametrize("flag, value, key", [
    ("--img_size", ["112"], "img_size 56"),
    ("--features_list", ["1", "2", "3", "4"], "features_list 2 4 6 8"),
    ("--model_name", ["ViT-B-16"], f"model_name {TINY_MODEL}"),
])
def test_flags_that_contradict_the_checkpoint(setup, ckpt, tmp_path, capsys, no_model, flag, value, key):
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "out", flag, *value)) == 2
    line = one_error_line(capsys)
    assert f"{flag} {' '.join(value)} does not match {ckpt}" in line and key in line
    assert export_onnx.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.onnx"), flag, *value]) == 2
    assert f"{flag} {' '.join(value)} does not match" in one_error_line(capsys)
    # the same value as the metadata is fine (checked up to the model build)
    same = {"--img_size": [str(TINY_SIZE)], "--features_list": TINY_STAGES, "--model_name": [TINY_MODEL]}[flag]
    with pytest.raises(AssertionError, match="a model was built"):
        predict.main(argv(setup, ckpt, setup["images"], tmp_path / "out", flag, *same))


def test_export_output_is_checked_before_the_model(setup, ckpt, tmp_path, capsys, monkeypatch, no_model):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for output, expected in ((tmp_path, "is a folder"), (a_file / "m.onnx", "is a file, not a folder")):
        code = export_onnx.main(["--ckpt", str(ckpt), "--output", str(output), "--clip_ckpt", str(setup["clip"])])
        line = one_error_line(capsys)
        assert code == 2 and f"--output {output}" in line and expected in line, line

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(predict.tempfile, "mkstemp", denied)  # as root, permissions do not refuse: simulated
    code = export_onnx.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--clip_ckpt", str(setup["clip"])])
    line = one_error_line(capsys)
    assert code == 2 and f"--output {tmp_path / 'm.onnx'} cannot be written (Permission denied in {tmp_path})" in line


# ------------------------------------------------------------------------------------------------
# A memory bank of the right identity but another width


def test_memory_bank_of_another_width(setup, ckpt, tmp_path, capsys):
    bank = tmp_path / "bank.pt"
    support = tmp_path / "support"
    support.mkdir()
    (support / "n.png").write_bytes((setup["images"] / "a.png").read_bytes())
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "o1", "--support", str(support),
                             "--save_bank", str(bank), "--no_overlays")) == 0
    state = torch.load(bank, weights_only=True)
    state["stages"] = [t[:, :32].contiguous() for t in state["stages"]]  # identity kept, width halved
    torch.save(state, bank)
    capsys.readouterr()
    assert predict.main(argv(setup, ckpt, setup["images"], tmp_path / "o2", "--bank", str(bank))) == 2
    line = one_error_line(capsys)
    assert f"--bank {bank} holds stage-1 tokens of shape" in line and "[rows, 64]" in line and "--save_bank" in line
    assert not (tmp_path / "o2").exists() and temporaries(tmp_path) == []
