"""Runs trained together (mvfa.runs.run.run_together): the release's protocol and the leak-free one
follow one training trajectory, and each run's files equal those of the run made alone, bit for bit."""
from __future__ import annotations

import csv
import io
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dataset.synthetic import generate_benchmark
from mvfa.runs.config import RunConfig
from mvfa.runs.run import PER_RUN_SETTINGS, run, run_together
from mvfa.runtime.errors import MVFAError
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

PROTOCOLS = {"release": dict(select="test", normalize="test"), "leakfree": dict(select="valid", normalize="valid")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("together")
    generate_benchmark(root / "data", seed=4, image_size=64, n_valid=(5, 5), n_test=(4, 4),
                       datasets=["Brain", "Liver", "Chest"])  # small: two protocols, two modes, each twice
    return {"data": root / "data", "clip": tiny_clip}


def config(bench, folder: Path, mode: str, obj: str, protocol: str, **changes) -> RunConfig:
    return RunConfig(
        mode=mode, train=True, obj=obj, data_path=bench["data"], save_path=folder, output_dir=folder,
        model_name=TINY_MODEL, clip_ckpt=bench["clip"], img_size=TINY_SIZE, features_list=tuple(int(s) for s in TINY_STAGES),
        shot=2, iterate=0, epoch=2, learning_rate=1e-3 if mode == "few-shot" else 1e-4, eval_batch_size=4, save_maps=2,
        fewshot_seed_dirs=(bench["data"] / "no-seed-lists",), cache_dir=None, **PROTOCOLS[protocol], **changes,
    )


def files_of(folder: Path) -> dict:
    """Everything a run writes that must not depend on being trained together (not the run time; its
    own folder's name is written as <run>)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.endswith(".lock"):
            continue
        name = path.relative_to(folder).as_posix()
        if name == "metrics.json":
            payload = json.loads(path.read_text().replace(str(folder), "<run>"))
            payload["metrics"].pop("seconds")
            out[name] = payload
        elif path.suffix == ".pth":
            out[name] = torch.load(path, weights_only=True)
        else:
            out[name] = path.read_bytes()
    return out


def assert_same(together: dict, alone: dict) -> None:
    assert together.keys() == alone.keys()
    for name, value in alone.items():
        if name.endswith(".pth"):
            assert together[name]["meta"] == value["meta"], name
            for group in ("seg_adapters", "det_adapters"):
                assert all(torch.equal(together[name][group][k], v) for k, v in value[group].items()), name
        else:
            assert together[name] == value, name


@pytest.mark.parametrize("mode, obj", [("few-shot", "Brain"), ("zero-shot", "Liver")])
def test_both_protocols_trained_together_equal_the_runs_made_alone(bench, tmp_path, mode, obj):
    together = [config(bench, tmp_path / "together" / p, mode, obj, p) for p in PROTOCOLS]
    alone = [config(bench, tmp_path / "alone" / p, mode, obj, p) for p in PROTOCOLS]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        results = run_together(together)
    assert "[--select test] selected epoch" in printed.getvalue()
    assert "[--select valid] selected epoch" in printed.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        single = [run(c) for c in alone]
    for protocol, shared, own in zip(PROTOCOLS, results, single):
        assert shared.metrics == {**own.metrics, "seconds": shared.metrics["seconds"]}, protocol
        assert_same(files_of(tmp_path / "together" / protocol), files_of(tmp_path / "alone" / protocol))
    log = {p: list(csv.DictReader(open(tmp_path / "together" / p / "train_log.csv"))) for p in PROTOCOLS}
    assert [r["loss"] for r in log["release"]] == [r["loss"] for r in log["leakfree"]] or mode == "zero-shot"
    assert "test_image_auroc" in log["release"][0] and "test_image_auroc" not in log["leakfree"][0]


def test_runs_that_would_train_differently_are_refused(bench, tmp_path):
    release = config(bench, tmp_path / "a", "few-shot", "Brain", "release")
    for change in ({"learning_rate": 1e-2}, {"iterate": 1}, {"epoch": 3}):
        other = replace(config(bench, tmp_path / "b", "few-shot", "Brain", "leakfree"), **change)
        with pytest.raises(MVFAError, match=f"these differ too: {next(iter(change))}"):
            run_together([release, other])
    with pytest.raises(MVFAError, match="their own --output_dir"):
        run_together([release, replace(release, select="valid", normalize="valid")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work
    assert {"select", "normalize", "output_dir", "save_path"} <= set(PER_RUN_SETTINGS)


def test_a_leak_free_run_fits_its_valid_statistics_once(bench, tmp_path, monkeypatch):
    """Calibration and --normalize valid read the same fit of the kept adapters (one fit_reference per run)."""
    from mvfa.runs import run as run_module

    fits = []
    fit = run_module.fit_reference
    monkeypatch.setattr(run_module, "fit_reference", lambda *a, **k: fits.append(1) or fit(*a, **k))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run(replace(config(bench, tmp_path / "leakfree", "few-shot", "Chest", "leakfree"), epoch=1, save_maps=None))
    assert len(fits) == 1
    assert "normalisation: fitted on" in printed.getvalue() and "calibration: normalisation fitted on" in printed.getvalue()
