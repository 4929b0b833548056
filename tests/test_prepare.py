"""dataset.prepare: flat folders of images (masks optional) -> the release's layout, deterministically."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import prepare
from dataset.medical import ImageSet, open_dataset

N_NORMAL, N_ABNORMAL = 10, 6


@pytest.fixture
def flat(tmp_path) -> dict[str, Path]:
    """10 normal and 6 abnormal 20x20 images; masks named like the image, or <stem>_mask.png, or .png for a .jpg."""
    rng = np.random.default_rng(0)
    folders = {name: tmp_path / name for name in ("normal", "abnormal", "masks")}
    for folder in folders.values():
        folder.mkdir()
    for i in range(N_NORMAL):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folders["normal"] / f"n{i:02d}.png")
    for i in range(N_ABNORMAL):
        suffix = ".jpg" if i == 5 else ".png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folders["abnormal"] / f"a{i:02d}{suffix}")
        mask = np.zeros((20, 20), dtype=np.uint8)
        mask[5:10, 5:10] = 255
        name = f"a{i:02d}_mask.png" if i in (1, 2) else f"a{i:02d}.png"
        Image.fromarray(mask).save(folders["masks"] / name)
    (folders["normal"] / "notes.txt").write_text("not an image\n")
    (folders["normal"] / "sub").mkdir()
    (folders["normal"] / ".DS_Store").write_bytes(b"\0")
    return folders


def args(flat: dict[str, Path], out: Path, *extra: str, masks: bool = True) -> list[str]:
    argv = ["--normal", str(flat["normal"]), "--abnormal", str(flat["abnormal"]), "--out", str(out), *extra]
    return argv + (["--masks", str(flat["masks"]), "--mask_suffix", "_mask"] if masks else [])


def split_of(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "split.csv", newline="") as stream:
        return [(row["split"], row["class"], row["file"]) for row in csv.DictReader(stream)]


def test_prepare_writes_the_layout_and_reports(flat, tmp_path, capsys):
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(args(flat, out)) == 0
    printed = capsys.readouterr().out
    assert "masks yes, all 6 abnormal images (3 by file name, 3 by stem)" in printed
    assert "notes.txt (not an image)" in printed and "sub (a folder, not searched)" in printed
    assert ".DS_Store" not in printed
    lines = printed.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("split")))
    table = [line.split() for line in lines[header : header + 4]]
    assert table[0] == ["split", "normal", "abnormal", "masks"]
    assert table[1] == ["valid", "3", "2", "2"] and table[2] == ["test", "7", "4", "4"] and table[3] == ["total", "10", "6", "6"]

    dataset = open_dataset(tmp_path / "data", "Knee")
    assert dataset.has_masks
    valid, test = dataset.samples("valid"), dataset.samples("test")
    assert [s.label for s in valid].count(0) == 3 and [s.label for s in valid].count(1) == 2
    assert len(test) == 11 and all(s.mask_path is not None for s in valid + test if s.label == 1)
    assert {p.name for p in (out / "valid" / "Ungood" / "anomaly_mask").iterdir()} | {
        p.name for p in (out / "test" / "Ungood" / "anomaly_mask").iterdir()} == {f"a{i:02d}.png" for i in range(6)}
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "Knee_AD"]
    assert leftovers == []


def test_split_is_deterministic_and_order_free(flat, tmp_path):
    assert prepare.main(args(flat, tmp_path / "one" / "Knee_AD")) == 0
    assert prepare.main(args(flat, tmp_path / "two" / "Knee_AD")) == 0
    assert split_of(tmp_path / "one" / "Knee_AD") == split_of(tmp_path / "two" / "Knee_AD")
    assert prepare.main(args(flat, tmp_path / "three" / "Knee_AD", "--seed", "1")) == 0
    assert split_of(tmp_path / "three" / "Knee_AD") != split_of(tmp_path / "one" / "Knee_AD")
    names = [f"x{i}.png" for i in range(20)]
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    assert prepare.split_order(names, 0, "normal") == prepare.split_order(shuffled, 0, "normal")
    assert [prepare.valid_count(n, 0.3) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 1, 3]


def test_without_masks_and_hard_links(flat, tmp_path):
    out = tmp_path / "Chest2_AD"
    assert prepare.main(args(flat, out, "--link", masks=False)) == 0
    dataset = open_dataset(tmp_path, "Chest2")
    assert not dataset.has_masks
    sample = dataset.samples("test")[0]
    assert sample.path.stat().st_ino == (flat["normal"] / sample.path.name).stat().st_ino


@pytest.mark.parametrize("case", ["exists", "missing mask", "bad name", "unreadable", "fraction", "mask size"])
def test_bad_input_gives_one_line_and_writes_nothing(flat, tmp_path, capsys, case):
    out, extra, expected = tmp_path / "data" / "Knee_AD", [], ""
    if case == "exists":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("x")
        expected = "not empty"
    elif case == "missing mask":
        (flat["masks"] / "a03.png").unlink()
        expected = "a03.png"
    elif case == "bad name":
        out, expected = tmp_path / "data" / "Knee", "_AD"
    elif case == "unreadable":
        (flat["abnormal"] / "a09.png").write_bytes(b"not a png")
        (flat["masks"] / "a09.png").write_bytes(b"not a png")
        expected = "a09.png"
    elif case == "fraction":
        extra, expected = ["--valid_fraction", "1.5"], "--valid_fraction"
    elif case == "mask size":
        Image.new("L", (10, 10)).save(flat["masks"] / "a00.png")
        expected = "a00.png"
    assert prepare.main(args(flat, out, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    parent = out.parent
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not parent.exists() or not any(parent.iterdir())


# ------------------------------------------------------------------------------------------------
# Mask values


def write_masks(flat: dict[str, Path], values: int | tuple[int, int, int], *, rgb: bool = False) -> None:
    """Rewrite every mask of the fixture with its lesion set to `values` (an int, or an RGB triple)."""
    for path in flat["masks"].iterdir():
        shape = (20, 20, 3) if rgb else (20, 20)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[5:10, 5:10] = values
        Image.fromarray(mask).save(path)


@pytest.mark.parametrize("case,values,expected", [
    ("zero one", 1, "holds values 0, 1: a mask holds only 0 (background) and 255 (anomaly) (a 0/1 mask reads as empty)"),
    ("grey", 128, "holds values 0, 128:"),
    ("colour", (255, 0, 0), "colour image (its R, G, B channels differ at 25 pixels)"),
])
def test_bad_masks_stop_prepare_with_one_line(flat, tmp_path, capsys, case, values, expected):
    write_masks(flat, values, rgb=case == "colour")
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(args(flat, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: mask ") and expected in err, err
    assert "pass --binarize_masks to convert" in err and err.strip().endswith("(5 more masks are not 0/255 either)")
    assert not (tmp_path / "data").exists()


def test_equal_channel_rgb_masks_are_masks(flat, tmp_path, capsys):
    write_masks(flat, (255, 255, 255), rgb=True)
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(args(flat, out)) == 0
    assert "converted" not in capsys.readouterr().out
    copied = out / "test" / "Ungood" / "anomaly_mask"
    assert all(np.asarray(Image.open(p)).ndim == 3 for p in copied.iterdir())  # copied as they were


@pytest.mark.parametrize("case,values,threshold,lesion", [
    ("zero one", 1, [], True),
    ("grey below the threshold", 100, ["127"], False),
    ("grey above the threshold", 200, ["127"], True),
    ("colour", (0, 0, 90), [], True),
])
def test_binarize_masks_converts_explicitly(flat, tmp_path, capsys, case, values, threshold, lesion):
    write_masks(flat, values, rgb=case == "colour")
    keep = flat["masks"] / "a00.png"  # one mask already 0/255: copied, not converted
    write_one = np.zeros((20, 20), np.uint8)
    write_one[2:4, 2:4] = 255
    Image.fromarray(write_one).save(keep)
    out = tmp_path / "data" / "Knee_AD"
    code = prepare.main(args(flat, out, "--binarize_masks", *threshold))
    printed, err = capsys.readouterr()
    if not lesion:  # every converted mask is empty, a00 alone has pixels: a warning, not an error
        assert code == 0, err
        assert "warning: 5 abnormal images have an empty mask" in printed
    else:
        assert code == 0, err
        assert "empty mask" not in printed
    limit = threshold[0] if threshold else "0"
    assert f"5 converted to 0/255 (values > {limit} -> 255, written as PNG)" in printed
    with open(out / "split.csv", newline="") as stream:
        rows = {row["file"]: row for row in csv.DictReader(stream) if row["class"] == "abnormal"}
    assert rows["a00.png"]["mask_binarized"] == "0" and all(rows[f]["mask_binarized"] == "1" for f in rows if f != "a00.png")
    assert rows["a05.jpg"]["mask"] == "a05.png"
    dataset = open_dataset(tmp_path / "data", "Knee")
    for sample in dataset.samples("valid") + dataset.samples("test"):
        if sample.label:
            pixels = np.asarray(Image.open(sample.mask_path))
            assert set(np.unique(pixels).tolist()) <= {0, 255}
            if sample.path.name != "a00.png":
                assert bool(pixels[5:10, 5:10].all()) == lesion and not pixels[:5].any()
            assert ImageSet([sample], 20)[0]["mask"].sum() == pixels.astype(bool).sum()


def test_empty_masks_warn_and_all_empty_is_an_error(flat, tmp_path, capsys):
    Image.new("L", (20, 20)).save(flat["masks"] / "a00.png")
    assert prepare.main(args(flat, tmp_path / "one" / "Knee_AD")) == 0
    assert "warning: 1 abnormal images have an empty mask (first: a00.png)" in capsys.readouterr().out
    write_masks(flat, 0)
    assert prepare.main(args(flat, tmp_path / "two" / "Knee_AD")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "every mask of the 6 abnormal images is empty" in err
    assert prepare.main(args(flat, tmp_path / "three" / "Knee_AD", "--binarize_masks", masks=False)) == 2
    assert "--binarize_masks 0 is invalid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The output folder


@pytest.mark.parametrize("case", ["a file", "read-only empty folder", "read-only parent", "parent is a file"])
def test_unusable_output_fails_up_front_with_one_line(flat, tmp_path, capsys, monkeypatch, case):
    parent = tmp_path / "data"
    parent.mkdir()
    out = parent / "Knee_AD"
    if case == "a file":
        out.write_text("x")
        expected = "is a file, not a folder"
    elif case == "read-only empty folder":
        out.mkdir()
        out.chmod(0o555)
        expected = "is read-only"
    elif case == "read-only parent":
        parent.chmod(0o555)
        out = parent / "deeper" / "Knee_AD"
        expected = f"cannot be created: {parent} is read-only"
    else:
        (parent / "plain").write_text("x")
        out = parent / "plain" / "Knee_AD"
        expected = "plain is a file, not a folder"
    read = []
    monkeypatch.setattr(prepare, "list_folder", lambda *a: read.append(a) or [])
    try:
        assert prepare.main(args(flat, out)) == 2
    finally:
        parent.chmod(0o755)
        if out.is_dir():
            out.chmod(0o755)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert read == []  # refused before reading any input


def test_failed_write_leaves_nothing(flat, tmp_path, capsys, monkeypatch):
    """A copy failing half-way removes the partial folder and the parent folders this run created."""
    real_copy, copied = prepare.shutil.copy2, []

    def failing_copy(source, target):
        if len(copied) == 5:
            raise OSError(28, "No space left on device", str(target))
        copied.append(target)
        return real_copy(source, target)

    monkeypatch.setattr(prepare.shutil, "copy2", failing_copy)
    out = tmp_path / "made" / "here" / "Knee_AD"
    assert prepare.main(args(flat, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err and "No space left on device" in err, err
    assert len(copied) == 5 and not (tmp_path / "made").exists()
    # an existing empty --out is kept as it was on failure, and filled on success
    out = tmp_path / "kept" / "Knee_AD"
    out.mkdir(parents=True)
    copied.clear()
    assert prepare.main(args(flat, out)) == 2
    assert out.is_dir() and list(out.iterdir()) == [] and [p.name for p in out.parent.iterdir()] == ["Knee_AD"]
    monkeypatch.undo()
    capsys.readouterr()
    assert prepare.main(args(flat, out)) == 0 and (out / "split.csv").is_file()
