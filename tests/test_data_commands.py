"""Commands on prepared data: the `next:` command dataset.prepare prints runs as printed, and a bad
mask stops the scripts with one line (tiny random CLIP substituted for ViT-L, 1 epoch)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
import shlex

from PIL import Image
import numpy as np
import pytest
import torch

from CLIP import create_model
from dataset import prepare
from mvfa import cli
from mvfa.method.model import AdaptedViT, save_checkpoint
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES


@pytest.fixture(scope="module")
def clip(tiny_clip) -> Path:
    return tiny_clip  # conftest.py


def flat_folders(root: Path, n_normal: int, n_abnormal: int, mask_value: int = 255) -> list[str]:
    """prepare's argv for flat folders of random 20x20 images, with masks holding `mask_value` in a square."""
    rng = np.random.default_rng(0)
    folders = {name: root / name for name in ("normal", "abnormal", "masks")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(n_normal):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folders["normal"] / f"n{i:02d}.png")
    for i in range(n_abnormal):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folders["abnormal"] / f"a{i:02d}.png")
        mask = np.zeros((20, 20), dtype=np.uint8)
        mask[4:12, 6:14] = mask_value
        Image.fromarray(mask).save(folders["masks"] / f"a{i:02d}.png")
    return ["--normal", str(folders["normal"]), "--abnormal", str(folders["abnormal"]), "--masks", str(folders["masks"])]


def next_argv(printed: str) -> list[str]:
    """The train_few.py arguments of the `next:` line."""
    line = next(line for line in printed.splitlines() if line.startswith("next: "))
    words = shlex.split(line[len("next: "):])
    assert words[:2] == ["python", "train_few.py"], line
    return words[2:]


def tiny(clip: Path, work: Path) -> list[str]:
    """The flags that put the tiny random CLIP in place of ViT-L (and keep outputs in `work`)."""
    return ["--model_name", TINY_MODEL, "--clip_ckpt", str(clip), "--img_size", str(TINY_SIZE),
            "--features_list", *TINY_STAGES, "--epoch", "1", "--device", "cpu",
            "--save_path", str(work / "ckpt"), "--output_dir", str(work / "out")]


@pytest.mark.parametrize("n_normal,n_abnormal,shot,select", [
    (10, 6, 1, "valid"),   # valid 3 / 2: at most 2-shot, 1 with --select valid (issue 19's case)
    (3, 3, 1, "last"),     # valid 1 / 1: no valid image would be left for --select valid
])
def test_printed_next_command_runs(tmp_path, capsys, clip, n_normal, n_abnormal, shot, select):
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(flat_folders(tmp_path / "in", n_normal, n_abnormal) + ["--out", str(out)]) == 0
    argv = next_argv(capsys.readouterr().out)
    assert argv[argv.index("--shot") + 1] == str(shot) and argv[argv.index("--select") + 1] == select
    assert "--iterate" not in argv
    code = cli.main_train_few(argv + tiny(clip, tmp_path / "run"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"support: {shot} abnormal + {shot} normal valid images" in captured.out


def test_next_command_of_a_benchmark_name_draws_its_support(tmp_path, capsys, clip):
    """A prepared dataset named like one with shipped seed lists (real BMAD file names) draws its support."""
    seeds = tmp_path / "seeds"
    (seeds / "Brain").mkdir(parents=True)
    (seeds / "Brain" / "1-shot.txt").write_text("a-0: not_here.png\nn-0: nor_here.png\n")
    out = tmp_path / "data" / "Brain_AD"
    flags = flat_folders(tmp_path / "in", 10, 6)
    folders = dict(zip(flags[::2], map(Path, flags[1::2])))
    report = prepare.prepare(folders["--normal"], folders["--abnormal"], out, folders["--masks"])
    argv = next_argv(dataclasses.replace(report, seed_lists=seeds).text())
    assert argv[argv.index("--iterate") + 1] == "-1"
    code = cli.main_train_few(argv + tiny(clip, tmp_path / "run") + ["--fewshot_seed_dir", str(seeds)])
    assert code == 0, capsys.readouterr().err


def test_no_next_command_without_valid_images_of_a_class(tmp_path, capsys):
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(flat_folders(tmp_path / "in", 10, 1) + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "next: no few-shot run is possible yet (valid holds no abnormal image)" in printed
    assert "train_few.py" not in printed


def test_scripts_stop_on_a_bad_mask_with_one_line(tmp_path, capsys, clip):
    """Masks written by hand into the layout (0/1 here) stop training and testing with one line naming a mask."""
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(flat_folders(tmp_path / "in", 10, 6) + ["--out", str(out)]) == 0
    capsys.readouterr()
    for mask in out.glob("*/Ungood/anomaly_mask/*.png"):
        Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
    base = ["--obj", "Knee", "--data_path", str(tmp_path / "data"), "--prompt_name", "knee", "--shot", "1"]
    # adapters for test_few, which reads its checkpoint before any image (the release's name in --save_path)
    torch.manual_seed(0)
    adapters = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES]).adapter_state()
    save_checkpoint(adapters, tmp_path / "run" / "ckpt" / "Knee.pth")
    for main in (cli.main_train_few, cli.main_test_few):
        code = main(base + tiny(clip, tmp_path / "run"))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: mask ") and "anomaly_mask" in err and "holds values 0, 1" in err


def test_an_early_error_leaves_no_support_list(tmp_path, capsys, clip):
    out = tmp_path / "data" / "Knee_AD"
    assert prepare.main(flat_folders(tmp_path / "in", 3, 3) + ["--out", str(out)]) == 0
    base = ["--obj", "Knee", "--data_path", str(tmp_path / "data"), "--prompt_name", "knee", "--shot", "1", "--select", "valid"]
    assert cli.main_train_few(base + tiny(clip, tmp_path / "run")) == 2
    assert "--select valid needs normal and abnormal valid images" in capsys.readouterr().err
    left = tmp_path / "run" / "out"
    assert not left.exists() or list(left.iterdir()) == []
