"""python -m mvfa.bench: a smoke run writes every section's figures (their values are never asserted);
the library never imports the bench."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mvfa import bench
from mvfa.bench.__main__ import SECTIONS
from mvfa.bench.forward import adapted_vit_flops
from mvfa.bench.together import further_epoch_rows

REPO = Path(__file__).resolve().parents[1]

# Figures each section reports on a CPU run (CUDA runs report images/s instead of GFLOP/s).
EXPECTED = {
    "forward": ["GFLOP per image, analytic", "GFLOP per image, blocks only", "GFLOP per image, torch FlopCounterMode",
                "forward GFLOP/s, best", "forward / matmul FLOP/s"],
    "train_step": ["train step s, release emulation (backbone weight grads)", "train step s, train_step from images",
                   "train step s, train_step from a cached prefix", "train step speed-up vs release, cached prefix"],
    "protocol": ["training s per image (training loop, batch 1)", "memory bank s per image",
                 "few-shot evaluation s per image (fused maps, pixel AUROC)",
                 "zero-shot evaluation s per image (maps, pixel AUROC)",
                 "few-shot protocol, extrapolated", "zero-shot protocol, extrapolated",
                 "zero-shot training steps/s, one target", "zero-shot training steps/s, 6 targets in lockstep",
                 "zero-shot protocol, 6 targets in lockstep, extrapolated"],
    "auroc": ["pixel_auroc s", "sklearn roc_auc_score s", "|pixel_auroc - sklearn|, same data",
              "pixel_auroc peak extra memory / scores size"],
    "memory": ["evaluate bytes per image beyond the maps", "fused map bytes per image",
               "bank search peak / (Q x B x 4 bytes)"],
    "startup": ["text features s, full 77-position context (release)", "text features s, trimmed context (mvfa.method.text)",
                "text features s, on-disk cache hit"],
    "process": ["test_few.py wall s, text cache cold", "test_few.py peak RSS, cold", "release emulation wall s",
                "release emulation peak RSS", "test_few speed-up vs release emulation, cold",
                "test_few peak RSS / release emulation, cold", "the same ViT forwards alone, s",
                "speed-up ceiling: release emulation / forwards alone"],
    "reproduce": ["reproduce wall s, protocols one by one", "reproduce wall s, protocols trained together",
                  "reproduce wall s, runs grouped, protocols together", "reproduce speed-up, together vs one by one",
                  "reproduce speed-up, grouped vs one by one"],
}


def test_reproduce_section_finds_the_runs_equal(smoke_report):
    """The section's runs agree (the note says so), whatever the timing."""
    _, report = smoke_report
    (row,) = [r for r in report["rows"] if r["figure"] == "reproduce speed-up, together vs one by one"]
    assert row["note"] == "results equal (every run's AUROCs)"


def test_reproduce_cost_per_further_epoch():
    """Known answer: 60 s at 2 epochs and 120 s at 4 one by one, 20 s and 35 s grouped: 30 and 7.5 s per
    further epoch, 4x; a grouped run no slower with more epochs gives no ratio."""
    rows = {row.figure: row.value for row in further_epoch_rows((2, 60.0, 20.0), (4, 120.0, 35.0), 0.0)}
    assert rows["reproduce speed-up at 4 epochs, grouped vs one by one"] == pytest.approx(120 / 35)
    assert rows["reproduce s per further epoch, one by one"] == 30.0
    assert rows["reproduce s per further epoch, grouped"] == 7.5
    assert rows["reproduce speed-up per further epoch, grouped vs one by one"] == 4.0
    (noise,) = [row for row in further_epoch_rows((2, 60.0, 20.0), (4, 120.0, 19.0), 0.0)
                if row.figure.startswith("reproduce speed-up per further epoch")]
    assert noise.value is None and "noise" in noise.note


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench.main(["--smoke", "--device", "cpu", "--json", str(path)])
    return code, json.loads(path.read_text())


def test_smoke_run_succeeds(smoke_report):
    code, report = smoke_report
    assert code == 0, [r for r in report["rows"] if r["figure"] == "error"]
    assert set(report["sections"]) == set(SECTIONS)
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["sections"]


@pytest.mark.parametrize("section", SECTIONS)
def test_section_figures_present(smoke_report, section):
    _, report = smoke_report
    figures = {r["figure"] for r in report["rows"] if r["section"] == section}
    missing = [f for f in EXPECTED[section] if f not in figures]
    assert not missing, f"{section} lacks {missing}; it has {sorted(figures)}"


def test_rows_are_complete(smoke_report):
    _, report = smoke_report
    for row in report["rows"]:
        assert set(row) == {"figure", "value", "unit", "section", "note"}, row  # measured figures, no verdicts
    assert report["device"]["cpu"] and report["device"]["cpu_cores"] >= 1
    assert report["config"]["model_name"] == "ViT-Tiny-14"


def test_flop_formula_matches_the_issue():
    """ViT-L/14 at 240 px: the 24 blocks are ~184 GFLOP (24 N w^2 + 4 N^2 w each, N = 290, w = 1024)."""
    flops = adapted_vit_flops(1024, 14, 240, 768, (6, 12, 18, 24))
    assert flops["tokens"] == 290
    assert flops["blocks_total"] == 24 * (24 * 290 * 1024**2 + 4 * 290**2 * 1024)
    assert 183e9 < flops["blocks_total"] < 184e9
    assert flops["adapters"] == 4 * 8 * 290 * 1024 * 768


def test_unknown_section_is_an_error(capsys):
    assert bench.main(["--only", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err


def library_files() -> list[Path]:
    """The library: mvfa outside mvfa/bench, dataset, CLIP and the root scripts."""
    files = [p for p in (REPO / "mvfa").rglob("*.py") if (REPO / "mvfa" / "bench") not in p.parents]
    for package in ("dataset", "CLIP"):
        files += (REPO / package).rglob("*.py")
    return sorted(files + list(REPO.glob("*.py")))


def imported_modules(source: str, package: str) -> set[str]:
    """Every module the `import` and `from ... import` statements of `source` name, relative imports
    resolved against `package` (`from a import b` counts as a.b too, since b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".") if package else []
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_bench(module: str) -> bool:
    return module.split(".")[:2] in (["mvfa", "bench"], ["mvfa", "bench_metrics"])


def test_no_library_module_imports_the_bench():
    files = library_files()
    assert REPO / "mvfa" / "runs" / "run.py" in files and REPO / "test_few.py" in files
    assert not any(REPO / "mvfa" / "bench" in p.parents for p in files)
    offenders = {}
    for path in files:
        package = ".".join(path.relative_to(REPO).parts[:-1])
        found = sorted(m for m in imported_modules(path.read_text(), package) if is_bench(m))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, offenders


@pytest.mark.parametrize("source", ["from . import bench", "from .bench.common import Context", "import mvfa.bench.forward",
                                    "from mvfa import bench_metrics", "from .bench_metrics import run"])
def test_the_import_check_sees_every_form(source):
    assert any(is_bench(m) for m in imported_modules(source, "mvfa")), source
    assert not any(is_bench(m) for m in imported_modules("from . import engine\nimport mvfa.benchmark_data", "mvfa"))
