"""Training really learns: few-shot and zero-shot runs through the real command lines on CPU.

Synthetic benchmark (dataset.synthetic, 64 px), a seeded random ViT-Tiny-14 at 112 px (an 8 x 8
patch grid), stages 2 4 6 8, --select last (no test labels used for selection), so the comparison
with the untrained adapters (--epoch 0 evaluates the initial random adapters) is honest.

Measured on this machine (2-core CPU) for data and backbone seeds 0, 1, 2 (the tests run seed 0),
untrained -> trained, image AUROC / pixel AUROC; few-shot k = 4, 5 epochs; zero-shot 3 epochs;
lr 1e-3:

    few-shot Retina_RESC (masks)        0.62->1.00 / 0.85->0.99   0.88->1.00 / 0.90->0.99   0.97->1.00 / 0.96->0.99
    few-shot Histopathology (no masks)  0.95->1.00                0.87->1.00                0.95->1.00
    zero-shot, target Histopathology    0.50->0.87                0.37->0.82                0.48->0.84
    zero-shot, target Liver             0.30->0.31 / 0.46->0.89   0.57->0.46 / 0.68->0.85   0.34->0.30 / 0.51->0.81

(Measured 2026-12-03 with the release's replayed initial adapters and epoch orders, mvfa.runs.replay.)

"A clear margin" over the untrained adapters is asserted as: training at least halves the error
1 - AUROC (an absolute gain cannot be asked of a value that starts at 0.9 and ends at 1.0). The
fixed thresholds are below every seed's trained value.

Where image AUROC does not learn on this backbone (measured, same settings): few-shot Chest
(0.80->0.65, 0.73->0.52, 0.59->0.55) and few-shot Brain on one seed of three (0.51->0.84,
0.76->0.66, 0.49->0.81); zero-shot image AUROC on the Liver and Chest targets (Chest 0.55->0.41).
There the detection adapters' image-level loss finds no local cue that the random backbone's
tokens share between datasets: after zero-shot training every Liver patch, tumour or not, scores
"normal" (mean abnormal probability 0.001-0.02), so the image score is noise. Pixel AUROC, trained
with masks, carries over to Liver and is asserted there.
"""
from __future__ import annotations

import json

import pytest

from dataset.synthetic import generate_benchmark
from mvfa import cli
from tests.scripts_helpers import NO_SEED_LISTS, TINY_STAGES

IMG_SIZE = "112"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("learning")
    generate_benchmark(root / "data", seed=0, image_size=64)
    return root, tiny_clip  # conftest.py: the backbone of seed 0


def metrics_after(main, root, clip, obj: str, epochs: int, tag: str, *extra: str) -> dict:
    out = root / tag / obj
    argv = [
        "--obj", obj, "--data_path", str(root / "data"), "--model_name", "ViT-Tiny-14", "--clip_ckpt", str(clip),
        "--img_size", IMG_SIZE, "--features_list", *TINY_STAGES, "--epoch", str(epochs), "--select", "last",
        "--learning_rate", "1e-3", "--threshold_rule", "none", "--save_path", str(out / "ckpt"),
        "--output_dir", str(out), "--device", "cpu", *extra,
    ]
    if main is cli.main_train_few:  # a support drawn from --seed: the shipped lists name BMAD files
        argv += ["--fewshot_seed_dir", str(root / NO_SEED_LISTS)]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())["metrics"]


def untrained_and_trained(main, bench, obj: str, epochs: int, *extra: str) -> tuple[dict, dict]:
    """Metrics of the initial adapters (--epoch 0) and after `epochs` of training with `extra` flags."""
    root, clip = bench
    return (metrics_after(main, root, clip, obj, 0, "untrained"),
            metrics_after(main, root, clip, obj, epochs, "trained", *extra))


def assert_learned(before: dict, after: dict, metric: str, threshold: float) -> None:
    """`metric` after training reaches `threshold` and at most half the untrained error 1 - AUROC."""
    assert after[metric] >= threshold, (metric, before, after)
    assert 1.0 - after[metric] <= 0.5 * (1.0 - before[metric]), (metric, before, after)


def test_few_shot_training_learns_on_a_dataset_with_masks(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_few, bench, "Retina_RESC", 5)
    capsys.readouterr()
    assert_learned(before, after, "image_auroc", 0.95)
    assert_learned(before, after, "pixel_auroc", 0.95)


def test_few_shot_training_learns_on_a_dataset_without_masks(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_few, bench, "Histopathology", 5)
    capsys.readouterr()
    assert "pixel_auroc" not in after
    assert_learned(before, after, "image_auroc", 0.95)


def test_zero_shot_leave_one_out_training_learns_image_scores(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_zero, bench, "Histopathology", 3)
    capsys.readouterr()
    assert_learned(before, after, "image_auroc", 0.8)


def test_zero_shot_leave_one_out_training_learns_pixel_maps(bench, capsys):
    before, after = untrained_and_trained(cli.main_train_zero, bench, "Liver", 3)
    capsys.readouterr()
    assert after["pixel_auroc"] >= 0.8 and after["pixel_auroc"] >= before["pixel_auroc"] + 0.15, (before, after)
