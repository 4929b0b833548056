"""The release's support lists ship in dataset/fewshot_seed: the default few-shot run uses the paper's
split, says so in its files, and test_few warns when a checkpoint was trained on another support."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dataset.medical import read_seed_file
from dataset.synthetic import generate_benchmark
from mvfa import cli
from mvfa.choices import DEFAULT_SEED_DIR
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

DATASETS = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")


def test_the_release_lists_are_shipped():
    for name in DATASETS:
        for shot in (2, 4, 8, 16):
            abnormal, normal = read_seed_file(DEFAULT_SEED_DIR / name / f"{shot}-shot.txt", 0)
            assert len(abnormal) == len(normal) == shot


@pytest.fixture(scope="module")
def liver_named_like_bmad(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    """A synthetic Liver whose valid images carry the file names of the shipped 4-shot list."""
    root = tmp_path_factory.mktemp("lists")
    generate_benchmark(root / "data", seed=3, image_size=64, n_valid=(5, 5), n_test=(4, 4), datasets=["Liver"])
    abnormal, normal = read_seed_file(DEFAULT_SEED_DIR / "Liver" / "4-shot.txt", 0)
    valid = root / "data" / "Liver_AD" / "valid"
    for kind, names in (("Ungood", abnormal), ("good", normal)):
        images = sorted((valid / kind / "img").iterdir())
        for image, name in zip(images, names):
            image.rename(image.with_name(name))
            mask = valid / kind / "anomaly_mask" / image.name
            if mask.is_file():
                mask.rename(mask.with_name(name))
    return {"root": root, "data": root / "data", "clip": tiny_clip, "names": (abnormal, normal)}


def argv_for(bench: dict, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(bench["data"]), "--model_name", TINY_MODEL, "--clip_ckpt", str(bench["clip"]),
            "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES, "--device", "cpu", "--cache_dir", "none",
            "--save_path", str(out / "ckpt"), "--output_dir", str(out / "run"), *extra]


def test_default_few_shot_run_reads_the_shipped_list(liver_named_like_bmad, tmp_path, capsys):
    """train_few.py with the release's flags only (--obj defaults to Liver, --shot 4, --iterate 0)."""
    bench = liver_named_like_bmad
    assert cli.main_train_few(argv_for(bench, tmp_path, "--epoch", "1", "--select", "last", "--threshold_rule", "none")) == 0
    shipped = DEFAULT_SEED_DIR / "Liver" / "4-shot.txt"
    assert f"(seed file {shipped}, lines a-0/n-0)" in capsys.readouterr().out
    written = (tmp_path / "run" / "4-shot.txt").read_text().splitlines()
    assert written[0] == f"# iterate 0: seed file {shipped}, lines a-0/n-0"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["support"]["source"] == f"seed file {shipped}, lines a-0/n-0"
    assert (metrics["support"]["abnormal"], metrics["support"]["normal"]) == bench["names"]
    assert metrics["obj"] == "Liver"


def test_test_few_warns_when_the_checkpoint_had_another_support(liver_named_like_bmad, tmp_path, capsys):
    bench = liver_named_like_bmad
    assert cli.main_train_few(argv_for(bench, tmp_path, "--epoch", "0", "--threshold_rule", "none")) == 0
    capsys.readouterr()
    assert cli.main_test_few(argv_for(bench, tmp_path)) == 0  # the same support: no warning
    assert "warning" not in capsys.readouterr().out
    drawn = argv_for(bench, tmp_path, "--checkpoint", str(tmp_path / "ckpt" / "Liver-4shot-it0-seed111.pth"),
                     "--iterate", "-1")
    shutil.rmtree(tmp_path / "run")
    assert cli.main_test_few(drawn) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1
    assert "was trained on another support" in lines[0] and "random draw (seed 111, iterate -1)" in lines[0]
