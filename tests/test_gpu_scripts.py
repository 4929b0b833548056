"""The scripts prepared for a lent GPU, at a tiny scale on the CPU: they must run as written before a
GPU session spends its minutes on them. scripts/gpu_protocol.sh (data, weights, train_few.py, the
timing line) and scripts/gpu_golden.py (the release-parity check), each with the interpreter running
the tests, not the first python3 on PATH."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_protocol_script_runs_at_a_tiny_scale_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MVFA_MODEL": "ViT-Tiny-14", "MVFA_IMG_SIZE": "56",
           "MVFA_STAGES": "2 4 6 8", "MVFA_TEST_NORMAL": "3", "MVFA_TEST_ABNORMAL": "70", "MVFA_EPOCHS": "1",
           "MVFA_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_protocol.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    timings = (tmp_path / "out" / "protocol.txt").read_text()
    assert "test images: 3 normal + 70 abnormal at 56 px (3 + 64 drawn)" in timings
    assert "protocol wall s: " in timings
    assert "Brain AUC : " in (tmp_path / "out" / "protocol.log").read_text()
    with open(tmp_path / "out" / "train_few" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 73 and sum(int(row["label"]) for row in rows) == 70  # the copies are scored too


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_protocol_script_runs_the_grouped_splits_at_a_tiny_scale_on_cpu(tmp_path):
    """MVFA_SPLITS=2: reproduce's 4-shot Brain table, 2 splits x both protocols in lockstep."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MVFA_MODEL": "ViT-Tiny-14", "MVFA_IMG_SIZE": "56",
           "MVFA_STAGES": "2 4 6 8", "MVFA_TEST_NORMAL": "3", "MVFA_TEST_ABNORMAL": "4", "MVFA_EPOCHS": "1",
           "MVFA_DEVICE": "cpu", "MVFA_SPLITS": "2", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_protocol.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "reproduce, 2 splits x 2 protocols in lockstep, 1 epochs wall s: " in (tmp_path / "out" / "protocol.txt").read_text()
    assert "(trained together: 2 splits in lockstep" in (tmp_path / "out" / "reproduce.log").read_text()
    with open(tmp_path / "out" / "reproduce" / "results.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted((row["protocol"], row["split"]) for row in rows) == [
        ("leakfree", "0"), ("leakfree", "1"), ("release", "0"), ("release", "1")]


def test_gpu_golden_script_runs_on_the_cpu(golden_dir, tmp_path):
    """scripts/gpu_golden.py, the release-parity check prepared for a lent GPU, on the CPU for one case:
    it prints each setting's differences from the golden values (on the CPU: float rounding)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_golden.py"), "--device", "cpu", "--golden", str(golden_dir),
         "--only", "zero-shot/Chest", "--json", str(tmp_path / "golden.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads((tmp_path / "golden.json").read_text())
    for dtypes in ("release", "fp32"):
        row = figures[f"test zero-shot Chest --scoring_dtypes {dtypes}"]
        assert row["image_auroc_diff"] < 1e-9 and row["image_score_max_diff"] < 2e-5
