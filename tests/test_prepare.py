"""dataset.prepare: flat folders of images (masks optional) -> the release's layout, deterministically."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import prepare
from dataset.medical import open_dataset

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
