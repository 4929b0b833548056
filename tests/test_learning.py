"""Training really learns: few-shot and zero-shot runs through the real command lines on CPU.

Synthetic benchmark (dataset.synthetic, seed 0, 64 px), a seeded random ViT-Tiny-14 at 112 px
(an 8 x 8 patch grid), stages 2 4 6 8, --select last (no test labels used for selection), so the
comparison with the untrained adapters (--epoch 0 evaluates the initial random adapters) is honest.
Measured on this machine (2-core CPU, seed 0): few-shot Brain image AUROC 0.67 -> 0.92, pixel
AUROC 0.80 -> 0.89 after 5 epochs; zero-shot leave-one-out, Liver target, pixel AUROC 0.60 -> 0.86
after 3 epochs at lr 1e-3; few-shot Retina_OCT2017 (no masks) image AUROC 0.78 -> 0.86 with the
textbook det loss (--det_loss bce). With the release's det loss (a probability passed to
BCE-with-logits) image AUROC without masks did not improve on this data (OCT2017 0.78 -> 0.61,
Chest 0.46 -> 0.59), and zero-shot image AUROC did not improve either (Liver 0.64 -> 0.29): that
is recorded here, not asserted. The thresholds sit between the untrained and trained values with
margin for rounding across machines; they were measured on one data and backbone seed.
"""
from __future__ import annotations

import json

import pytest

from dataset.synthetic import generate_benchmark
from mvfa import cli
from tests.scripts_helpers import TINY_STAGES, write_tiny_clip

IMG_SIZE = "112"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    generate_benchmark(root / "data", seed=0, image_size=64)
    return root, write_tiny_clip(root / "tiny.pt", seed=0)


def metrics_after(main, root, clip, obj: str, epochs: int, tag: str, *extra: str) -> dict:
    out = root / tag / obj
    argv = [
        "--obj", obj, "--data_path", str(root / "data"), "--model_name", "ViT-Tiny-14", "--clip_ckpt", str(clip),
        "--img_size", IMG_SIZE, "--features_list", *TINY_STAGES, "--epoch", str(epochs), "--select", "last",
        "--learning_rate", "1e-3", "--threshold_rule", "none", "--save_path", str(out / "ckpt"),
        "--output_dir", str(out), "--device", "cpu", *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())["metrics"]


def test_few_shot_training_learns_on_a_dataset_with_masks(bench, capsys):
    root, clip = bench
    before = metrics_after(cli.main_train_few, root, clip, "Brain", 0, "untrained")
    after = metrics_after(cli.main_train_few, root, clip, "Brain", 5, "trained")
    capsys.readouterr()
    assert after["image_auroc"] >= 0.85 and after["image_auroc"] >= before["image_auroc"] + 0.1, (before, after)
    assert after["pixel_auroc"] >= 0.85 and after["pixel_auroc"] >= before["pixel_auroc"] + 0.05, (before, after)


def test_few_shot_training_learns_on_a_dataset_without_masks(bench, capsys):
    root, clip = bench
    before = metrics_after(cli.main_train_few, root, clip, "Retina_OCT2017", 0, "untrained")
    after = metrics_after(cli.main_train_few, root, clip, "Retina_OCT2017", 5, "trained", "--det_loss", "bce")
    capsys.readouterr()
    assert "pixel_auroc" not in after
    assert after["image_auroc"] >= 0.82 and after["image_auroc"] >= before["image_auroc"] + 0.05, (before, after)


def test_zero_shot_leave_one_out_training_learns(bench, capsys):
    root, clip = bench
    before = metrics_after(cli.main_train_zero, root, clip, "Liver", 0, "untrained")
    after = metrics_after(cli.main_train_zero, root, clip, "Liver", 3, "trained")
    capsys.readouterr()
    assert after["pixel_auroc"] >= 0.8 and after["pixel_auroc"] >= before["pixel_auroc"] + 0.1, (before, after)
