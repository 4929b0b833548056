"""python -m mvfa.bench: a smoke run writes every section's figures (their values are never asserted)."""
from __future__ import annotations

import json

import pytest

from mvfa import bench

# Figures each section reports on a CPU run (CUDA runs report images/s instead of GFLOP/s).
EXPECTED = {
    "forward": ["GFLOP per image, analytic", "GFLOP per image, blocks only", "GFLOP per image, torch FlopCounterMode",
                "forward GFLOP/s, best", "forward / matmul FLOP/s"],
    "train_step": ["train step s, release emulation (backbone weight grads)", "train step s, train_step from images",
                   "train step s, train_step from a cached prefix", "train step speed-up vs release, cached prefix"],
    "protocol": ["training s per image (engine loop, batch 1)", "memory bank s per image",
                 "few-shot evaluation s per image (fused maps, pixel AUROC)",
                 "zero-shot evaluation s per image (maps, pixel AUROC)",
                 "few-shot protocol, extrapolated", "zero-shot protocol, extrapolated"],
    "auroc": ["pixel_auroc s", "sklearn roc_auc_score s", "|pixel_auroc - sklearn|, same data",
              "pixel_auroc peak extra memory / scores size"],
    "memory": ["evaluate bytes per image beyond the maps", "fused map bytes per image",
               "bank search peak / (Q x B x 4 bytes)"],
    "startup": ["text features s, full 77-position context (release)", "text features s, trimmed context (mvfa.text)",
                "text features s, on-disk cache hit"],
    "process": ["test_few.py wall s, text cache cold", "test_few.py peak RSS, cold", "release emulation wall s",
                "release emulation peak RSS", "test_few speed-up vs release emulation, cold",
                "test_few peak RSS / release emulation, cold", "the same ViT forwards alone, s",
                "speed-up ceiling: release emulation / forwards alone"],
}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench.main(["--smoke", "--device", "cpu", "--json", str(path)])
    return code, json.loads(path.read_text())


def test_smoke_run_succeeds(smoke_report):
    code, report = smoke_report
    assert code == 0, [r for r in report["rows"] if r["figure"] == "error"]
    assert set(report["sections"]) == set(bench.SECTIONS)
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["sections"]


@pytest.mark.parametrize("section", bench.SECTIONS)
def test_section_figures_present(smoke_report, section):
    _, report = smoke_report
    figures = {r["figure"] for r in report["rows"] if r["section"] == section}
    missing = [f for f in EXPECTED[section] if f not in figures]
    assert not missing, f"{section} lacks {missing}; it has {sorted(figures)}"


def test_rows_are_complete(smoke_report):
    _, report = smoke_report
    for row in report["rows"]:
        assert set(row) >= {"figure", "value", "unit", "target", "ok", "section"}
        assert (row["target"] is None) == (row["ok"] is None) or row["value"] is None, row
    assert report["device"]["cpu"] and report["device"]["cpu_cores"] >= 1
    assert report["config"]["model_name"] == "ViT-Tiny-14"


def test_flop_formula_matches_the_issue():
    """ViT-L/14 at 240 px: the 24 blocks are ~184 GFLOP (24 N w^2 + 4 N^2 w each, N = 290, w = 1024)."""
    flops = bench.adapted_vit_flops(1024, 14, 240, 768, (6, 12, 18, 24))
    assert flops["tokens"] == 290
    assert flops["blocks_total"] == 24 * (24 * 290 * 1024**2 + 4 * 290**2 * 1024)
    assert 183e9 < flops["blocks_total"] < 184e9
    assert flops["adapters"] == 4 * 8 * 290 * 1024 * 768


def test_unknown_section_is_an_error(capsys):
    assert bench.main(["--only", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
