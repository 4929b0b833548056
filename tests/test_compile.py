"""--compile (torch.compile of the adapted model's forward) on the tiny random CLIP: the same results
as the eager run to float rounding, and a compilation failure is one line.

Tolerances: compiled (inductor) kernels fuse the LayerNorm, GELU, residual and adapter operations and
sum in another order than the eager kernels, so tokens differ in the last bits (~1e-6 relative in fp32).
The scores are min-max normalised sums of softmaxed cosines, in [0, 1]; on this machine they moved by
6e-7 at most, so they are compared to 1e-4 (over 100x margin). AUROCs are rank statistics: they are
equal unless two scores lie within that rounding of each other; image AUROC is compared to 1e-9 when
the eager scores are at least 1e-4 apart (here 3e-3), and pixel AUROC (34,496 pixels, where near-ties
exist: each swapped pair moves it by ~3e-9) to 1e-5 (it moved by 1.7e-7 here).

Only test_few runs (no training): the bank and the test set have 11 images each and the evaluation
batch is 11, so each of the two compiled halves compiles for one shape and one grad mode.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from CLIP import create_model
from dataset.synthetic import generate_benchmark
from mvfa import cli
from mvfa.method.model import AdaptedViT, save_checkpoint
from mvfa.runtime import compute
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile")
    generate_benchmark(root / "data", seed=2, image_size=64, n_valid=(2, 2), n_test=(5, 6), datasets=["Brain"])
    clip = tiny_clip
    torch.manual_seed(5)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES])
    for parameter in model.adapter_parameters():  # adapters that move the stream (not their initialisation)
        parameter.data.normal_(0, 0.05)
    save_checkpoint(model.adapter_state(), root / "adapters.pth")
    return {"root": root, "data": root / "data", "clip": clip, "adapters": root / "adapters.pth"}


def run_test_few(setup, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    argv = tiny_argv(setup["data"], setup["clip"], setup["root"] / "ckpt", out, "Brain", "--shot", "1", "--iterate", "-1",
                     "--checkpoint", str(setup["adapters"]), "--eval_batch_size", "11", "--cache_dir", "none", *extra)
    assert cli.main_test_few(argv) == 0
    with open(out / "predictions.csv", newline="") as stream:
        return json.loads((out / "metrics.json").read_text()), list(csv.DictReader(stream))


def test_compiled_forward_gives_the_eager_results(setup, tmp_path):
    eager, eager_rows = run_test_few(setup, tmp_path / "eager")
    compiled, compiled_rows = run_test_few(setup, tmp_path / "compiled", "--compile")
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    assert [r["path"] for r in compiled_rows] == [r["path"] for r in eager_rows] and len(eager_rows) == 11
    scores = np.array([float(r["score"]) for r in eager_rows])
    np.testing.assert_allclose([float(r["score"]) for r in compiled_rows], scores, rtol=0, atol=SCORE_TOL)
    gaps = np.diff(np.sort(scores))
    if gaps.min() > SCORE_TOL:  # no two images within rounding of each other: the ranking is the same
        assert abs(compiled["metrics"]["image_auroc"] - eager["metrics"]["image_auroc"]) <= 1e-9
    assert abs(compiled["metrics"]["pixel_auroc"] - eager["metrics"]["pixel_auroc"]) <= 1e-5


def test_a_compilation_failure_is_one_line(setup, tmp_path, capsys, monkeypatch):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(compute.torch, "compile", lambda fn: torch._dynamo.optimize(failing_backend)(fn))
    argv = tiny_argv(setup["data"], setup["clip"], setup["root"] / "ckpt", tmp_path / "out", "Brain", "--shot", "1",
                     "--iterate", "-1", "--checkpoint", str(setup["adapters"]), "--cache_dir", "none", "--compile")
    assert cli.main_test_few(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile: torch.compile failed"), err
    assert "no C++ compiler here" in lines[0] and "run without --compile" in lines[0]
    assert not (tmp_path / "out" / "metrics.json").exists()
