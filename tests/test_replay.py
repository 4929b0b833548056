"""Training replays the release: the golden record of two whole training runs (../shared/golden/tiny/replay).

The release's train_few.py (Brain, 4-shot, iterate 0) and train_zero.py (Liver), 2 epochs each at
seed 111, recorded their initial adapters, every shuffled order, every evaluation's AUROCs, each
epoch's mean loss and the adapters they saved. The same flags here must give the same run.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from CLIP.config import load_config
from mvfa import cli
from mvfa.method.model import ResidualAdapter
from mvfa.runs import run as runs
from mvfa.runs.replay import BuildSizes, ReleaseRandom, clip_build_draws
from mvfa.runs.training import final_zero_shot_points, release_zero_shot_points

GOLDEN_FLAGS = ["--img_size", "84", "--features_list", "2", "4", "6", "8", "--seed", "111", "--epoch", "2",
                "--device", "cpu", "--threshold_rule", "none"]
STAGES = 4


def replay_dir(golden_dir: Path, kind: str) -> Path:
    folder = golden_dir / "replay" / kind
    if not (folder / "record.json").is_file():
        pytest.skip(f"the release's training record is not at {folder}")
    return folder


def adapters_of(state: dict) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("seg_adapters", "det_adapters") for k, v in state[part].items()}


class RecordingRandom(ReleaseRandom):
    """ReleaseRandom that remembers its instances, so a test can read the orders a run drew."""

    made: list["RecordingRandom"] = []

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        RecordingRandom.made.append(self)


def replay_run(golden_dir: Path, tmp: Path, kind: str) -> dict:
    """Run the golden record's training through the command line; what a test compares."""
    record_dir = replay_dir(golden_dir, kind)
    argv = ["--data_path", str(golden_dir / "data"), "--model_name", str(golden_dir / "config.json"),
            "--clip_ckpt", str(golden_dir / "clip_jit.pt"), *GOLDEN_FLAGS,
            "--save_path", str(tmp / "ckpt"), "--output_dir", str(tmp / "out")]
    if kind == "few":
        argv += ["--obj", "Brain", "--shot", "4", "--iterate", "0", "--fewshot_seed_dir", str(golden_dir / "fewshot_seed")]
        main = cli.main_train_few
    else:  # the listing the release read on its file system
        argv += ["--obj", "Liver", "--listings", str(record_dir / "listings.json")]
        main = cli.main_train_zero
    RecordingRandom.made.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "ReleaseRandom", RecordingRandom)
        assert main(argv) == 0
    (replay,) = RecordingRandom.made
    with open(tmp / "out" / "train_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    return {
        "record": json.loads((record_dir / "record.json").read_text()),
        "orders": json.loads((record_dir / "orders.json").read_text()),
        "passes": replay.passes,
        "log": log,
        "metrics": json.loads((tmp / "out" / "metrics.json").read_text()),
        "saved": torch.load(next((tmp / "ckpt").glob("*.pth")), weights_only=True),
        "selected": torch.load(record_dir / "selected_adapters.pt", weights_only=True),
    }


@pytest.fixture(scope="module")
def few_run(golden_dir, tmp_path_factory):
    return replay_run(golden_dir, tmp_path_factory.mktemp("replay-few"), "few")


@pytest.fixture(scope="module")
def zero_run(golden_dir, tmp_path_factory):
    return replay_run(golden_dir, tmp_path_factory.mktemp("replay-zero"), "zero")


@pytest.mark.parametrize("kind", ["few", "zero"])
def test_initial_adapters_bit_for_bit(golden_dir, kind):
    """Two emulated random CLIP builds, then the adapters' default init: the release's first draws."""
    recorded = adapters_of(torch.load(replay_dir(golden_dir, kind) / "initial_adapters.pt", weights_only=True))
    config = load_config(golden_dir / "config.json")
    replay = ReleaseRandom(111)
    replay.skip_clip_builds(config, 84)
    seg, det = (nn.ModuleList(ResidualAdapter(config.vision.width, config.embed_dim) for _ in range(STAGES)) for _ in range(2))
    replay.init_adapters(seg, det)
    ours = adapters_of({"seg_adapters": seg.state_dict(), "det_adapters": det.state_dict()})
    assert ours.keys() == recorded.keys()
    for key, value in recorded.items():
        assert torch.equal(ours[key], value), key


def test_every_recorded_order_is_drawn(few_run, zero_run):
    assert few_run["passes"] == few_run["orders"]  # per epoch: train (88 items), memory-bank support (44)
    assert zero_run["passes"] == zero_run["orders"]  # per epoch: the 120 batches of the five sources


@pytest.mark.parametrize("kind, metric_order", [("few", ("pixel", "image")), ("zero", ("image", "pixel"))])
def test_every_evaluation_matches(few_run, zero_run, kind, metric_order):
    run = few_run if kind == "few" else zero_run
    recorded = run["record"]["aucs_in_computation_order"]
    ours = [float(row[f"test_{metric}_auroc"]) for row in run["log"] for metric in metric_order]
    assert len(ours) == len(recorded)  # one train_log row per evaluation, in order
    assert ours == pytest.approx(recorded, abs=1e-4)


def test_evaluation_points_and_selection(few_run, zero_run):
    # few-shot: after each epoch, the strictly better score wins (the record kept epoch 1 of 0..1)
    assert [(r["epoch"], r["step"]) for r in few_run["log"]] == [("1", "88"), ("2", "88")]
    assert (few_run["metrics"]["training"]["best_epoch"], few_run["metrics"]["training"]["best_step"]) == (2, 88)
    assert "Best result" in few_run["record"]["stdout_tail"].split("epoch  1 :")[1]
    # zero-shot: before steps 0, 24, 48, 72, 96 of 120; the untrained adapters stayed the best
    assert [(r["epoch"], r["step"]) for r in zero_run["log"]] == [(str(e), str(s)) for e in (1, 2) for s in (0, 24, 48, 72, 96)]
    assert "best epoch found: epoch 0 batch 0" in zero_run["record"]["stdout_tail"]
    assert (zero_run["metrics"]["training"]["best_epoch"], zero_run["metrics"]["training"]["best_step"]) == (1, 0)


@pytest.mark.parametrize("kind", ["few", "zero"])
def test_epoch_mean_losses(few_run, zero_run, kind):
    run = few_run if kind == "few" else zero_run
    assert run["metrics"]["training"]["epoch_losses"] == pytest.approx(run["record"]["epoch_mean_losses"], rel=1e-5)


def test_saved_adapters(few_run, zero_run):
    # zero-shot: the release kept its first evaluation (the untrained adapters): equal bit for bit
    for key, value in adapters_of(zero_run["selected"]).items():
        assert torch.equal(adapters_of(zero_run["saved"])[key], value), key
    # few-shot, after 176 Adam steps: one step's gradients differ from the release's by ~1e-6 relative
    # (float rounding), and Adam's normalised step turns that into full steps for a few weights with
    # near-zero gradients (measured: relative Frobenius error 4e-6 to 1.4e-3 per tensor, the same as
    # our own run drifts from itself with 1e-6 relative noise added to its gradients)
    ours = adapters_of(few_run["saved"])
    for key, value in adapters_of(few_run["selected"]).items():
        error = (ours[key] - value).norm() / value.norm().clamp_min(1e-12)
        assert error < 5e-3, (key, float(error))
        assert (ours[key] - value).abs().max() < 0.1 * value.abs().max(), key


def test_release_zero_shot_schedule():
    assert release_zero_shot_points(120) == [0, 24, 48, 72, 96]
    assert release_zero_shot_points(12) == [0, 2, 4, 6, 8, 10]  # N not a multiple of 5: six evaluations
    assert release_zero_shot_points(3) == [0, 1, 2]  # N < 5: the release would divide by zero
    assert final_zero_shot_points(120) == [24, 48, 72, 96, 120]
    assert final_zero_shot_points(3) == [1, 2, 3]


def test_clip_build_draw_counts():
    """ViT-L/14 at 336 px: about 1.1e9 uniform draws for the two builds (METHOD.md section 8)."""
    config = load_config("ViT-L-14-336")
    total = sum(count for grid in (24, 17) for _, count in clip_build_draws(BuildSizes.of(config, grid)))
    assert 1.0e9 < total < 1.2e9


def test_replay_leaves_global_generators_alone():
    state = torch.get_rng_state()
    replay = ReleaseRandom(5)
    replay.shuffled_pass(10)
    replay.zero_shot_batches([[0, 1, 2], [3, 4]], 2)
    assert torch.equal(torch.get_rng_state(), state)
