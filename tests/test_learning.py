"""Training really learns: few-shot and zero-shot runs through the real command lines on CPU.

Synthetic benchmark (dataset.synthetic, 64 px), a seeded random ViT-Tiny-14 at 112 px (an 8 x 8
patch grid), stages 2 4 6 8, --select last (no test labels used for selection), so the comparison
with the untrained adapters (--epoch 0 evaluates the initial random adapters) is honest.

Measured on this machine (2-core CPU) for data and backbone seeds 0, 1, 2 (the test runs seed 0),
untrained -> trained, image AUROC / pixel AUROC:

    few-shot Brain, 5 epochs            0.51->0.84 / 0.68->0.88   0.76->0.66 / 0.83->0.96   0.49->0.81 / 0.78->0.93
    zero-shot Liver, 3 epochs, lr 1e-3  0.59->0.29 / 0.57->0.88   0.61->0.40 / 0.66->0.87   0.42->0.31 / 0.49->0.83
    few-shot Retina_OCT2017 (no masks,  0.94->0.88                0.75->0.68                0.91->0.91
      --det_loss bce), 5 epochs

Pixel AUROC learns on every seed, so it is asserted with thresholds every seed meets. Image AUROC
does not learn reliably with a tiny random backbone: few-shot with masks gains on two seeds of
three, few-shot without masks starts high (the memory bank of the untrained adapters already
separates) and does not gain, and zero-shot image AUROC falls on the Liver target (the detection
adapters learn image-wide cues of the source datasets, e.g. Histopathology's contrast, that are
inverted on hypodense liver tumours). For image AUROC the tests assert only that trained models
stay well above chance (every seed's value), not a learning margin: issue #5 records this.
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


def untrained_and_trained(main, bench, obj: str, epochs: int, *extra: str) -> tuple[dict, dict]:
    """Metrics of the initial adapters (--epoch 0) and after `epochs` of training with `extra` flags."""
    root, clip = bench
    return (metrics_after(main, root, clip, obj, 0, "untrained"),
            metrics_after(main, root, clip, obj, epochs, "trained", *extra))


def test_few_shot_training_learns_on_a_dataset_with_masks(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_few, bench, "Brain", 5)
    capsys.readouterr()
    assert after["pixel_auroc"] >= 0.85 and after["pixel_auroc"] >= before["pixel_auroc"] + 0.1, (before, after)
    assert after["image_auroc"] >= 0.6, (before, after)


def test_few_shot_training_without_masks_keeps_detection_above_chance(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_few, bench, "Retina_OCT2017", 5, "--det_loss", "bce")
    capsys.readouterr()
    assert "pixel_auroc" not in after
    assert after["image_auroc"] >= 0.6, (before, after)


def test_zero_shot_leave_one_out_training_learns(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_zero, bench, "Liver", 3)
    capsys.readouterr()
    assert after["pixel_auroc"] >= 0.8 and after["pixel_auroc"] >= before["pixel_auroc"] + 0.15, (before, after)
