"""scripts/gpu_protocol.sh, the prepared end-to-end protocol run for a lent GPU, at a tiny scale on
the CPU: it must run as written (data, weights, train_few.py, the timing line) before a GPU session
spends its minutes on it. It runs with the interpreter running the tests (PYTHON), not the first
python3 on PATH."""
from __future__ import annotations

import csv
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
