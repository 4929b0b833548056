"""Few-shot runs of several splits trained in lockstep (mvfa.runs.run.run_grouped): each run's results
equal those of its split trained alone to float rounding (batched products sum in another order)."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dataset.synthetic import generate_benchmark
from mvfa.runs.config import RunConfig
from mvfa.method.evaluation import evaluate_group
from mvfa.runs import run as run_module
from mvfa.runs.run import run_grouped, run_together
from mvfa.runtime.errors import MVFAError
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

SPLITS = (0, 1)
PROTOCOLS = {"release": dict(select="test", normalize="test"), "leakfree": dict(select="valid", normalize="valid")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grouped")
    generate_benchmark(root / "data", seed=6, image_size=64, n_valid=(5, 5), n_test=(4, 4), datasets=["Brain", "Chest"])
    return {"data": root / "data", "clip": tiny_clip}


def config(bench, folder: Path, obj: str, iterate: int, protocol: str, mode: str = "few-shot") -> RunConfig:
    few = mode == "few-shot"
    return RunConfig(
        mode=mode, train=True, obj=obj, data_path=bench["data"], save_path=folder, output_dir=folder,
        model_name=TINY_MODEL, clip_ckpt=bench["clip"], img_size=TINY_SIZE, features_list=tuple(int(s) for s in TINY_STAGES),
        shot=2 if few else 0, iterate=iterate if few else -1, epoch=2 if few else 1, eval_batch_size=4,
        fewshot_seed_dirs=(bench["data"] / "no-seed-lists",) if few else (), cache_dir=None, **PROTOCOLS[protocol],
    )


def sets(bench, root: Path, obj: str) -> list[list[RunConfig]]:
    return [[config(bench, root / f"split{i}" / p, obj, i, p) for p in PROTOCOLS] for i in SPLITS]


def assert_equal_to_rounding(grouped: list[list], alone: list[list]) -> None:
    """Each run's metrics equal its set's run alone to 1e-4, with the same selection of the same support
    (few-shot), and its adapters to float rounding."""
    for protocol_results, own_results in zip(grouped, alone):
        for protocol, got, own in zip(PROTOCOLS, protocol_results, own_results):
            where = (str(own.output_dir), protocol)
            for key, value in own.metrics.items():
                if key != "seconds":
                    assert got.metrics[key] == pytest.approx(value, abs=1e-4), (*where, key)
            got_state = torch.load(got.checkpoint, weights_only=True)
            own_state = torch.load(own.checkpoint, weights_only=True)
            for key in ("best_epoch", "best_step", "support", "iterate", "obj"):
                assert got_state["meta"].get(key) == own_state["meta"].get(key), (*where, key)
            for group in ("seg_adapters", "det_adapters"):
                for name, tensor in own_state[group].items():
                    torch.testing.assert_close(got_state[group][name], tensor, rtol=1e-4, atol=1e-5)


def test_splits_of_several_datasets_in_lockstep_equal_each_split_alone(bench, tmp_path, monkeypatch):
    """Brain's two splits (with masks: fused maps) and Chest's first (without: fused scores) in one group."""
    grouped_sets = sets(bench, tmp_path / "grouped", "Brain") + sets(bench, tmp_path / "grouped" / "chest", "Chest")[:1]
    alone_sets = sets(bench, tmp_path / "alone", "Brain") + sets(bench, tmp_path / "alone" / "chest", "Chest")[:1]
    together = []  # Brain's splits' test-set selections, evaluated together once per epoch (Chest has one split)
    monkeypatch.setattr(run_module, "evaluate_group", lambda *a, **k: together.append(1) or evaluate_group(*a, **k))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        grouped = run_grouped(grouped_sets)
        alone = [run_together(configs) for configs in alone_sets]
    assert len(together) == 2  # 2 epochs
    assert "run 3: [--select valid] epoch 2/2" in printed.getvalue()  # each line says whose it is
    assert_equal_to_rounding(grouped, alone)
    for configs, results in zip(grouped_sets, grouped):
        for cfg, result in zip(configs, results):
            written = json.loads((result.output_dir / "metrics.json").read_text())
            assert written["config"]["iterate"] == cfg.iterate and written["config"]["obj"] == cfg.obj
            assert written["support"]["source"].startswith("random draw")


def test_zero_shot_targets_in_lockstep_equal_each_target_alone(bench, tmp_path, monkeypatch):
    """Brain and Chest as zero-shot targets (each the other's source) trained together, both protocols;
    each target's test split, decoded once, is the other's source (no second decode)."""
    from dataset.tensors import TensorSet

    def zero_sets(root: Path) -> list[list[RunConfig]]:
        return [[config(bench, root / obj / p, obj, 0, p, mode="zero-shot") for p in PROTOCOLS] for obj in ("Brain", "Chest")]

    loads, load = [], TensorSet.load
    monkeypatch.setattr(TensorSet, "load", classmethod(lambda cls, samples, *a, **k: loads.append(k.get("desc")) or load(
        samples, *a, **k)))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        grouped = run_grouped(zero_sets(tmp_path / "grouped"))
        decoded_together, loads[:] = list(loads), []
        alone = [run_together(configs) for configs in zero_sets(tmp_path / "alone")]
    assert "run 2: [--select test] epoch 1/1" in printed.getvalue()
    def of_test_splits(descriptions):  # the loads of test splits, as targets or as sources
        return sorted(d for d in descriptions if d.endswith((" test", "(source)")))

    assert of_test_splits(decoded_together) == ["Brain test", "Chest test"]
    assert of_test_splits(loads) == ["Brain (source)", "Brain test", "Chest (source)", "Chest test"]
    assert_equal_to_rounding(grouped, alone)


def test_runs_that_differ_in_more_than_the_target_and_split_are_refused(bench, tmp_path):
    base = sets(bench, tmp_path, "Brain")
    other = [[replace(c, learning_rate=1e-2) for c in base[1]]]
    with pytest.raises(MVFAError, match="these differ too: learning_rate"):
        run_grouped([base[0], *other])
    zero = [[config(bench, tmp_path / "zero" / p, "Chest", 0, p, mode="zero-shot") for p in PROTOCOLS]]
    with pytest.raises(MVFAError, match="these differ too: mode"):
        run_grouped([base[0], *zero])
    with pytest.raises(MVFAError, match="these differ too: train"):  # a test run among training runs
        run_grouped([base[0], [replace(base[1][0], train=False)]])
    with pytest.raises(MVFAError, match="test runs made together must differ only in .*these differ too: seed"):
        run_grouped([[replace(configs[0], train=False, seed=seed)] for seed, configs in zip((1, 2), base)])
    assert not any(tmp_path.rglob("metrics.json"))  # refused before any work


def test_train_few_with_several_iterates_trains_them_in_lockstep(synthetic_data, tiny_clip, tmp_path, capsys):
    """train_few.py --iterate 0 1: both splits trained together, each in <output_dir>/iterate<i> with its
    own checkpoint and run_config.json; each equals its split's own run to float rounding."""
    from mvfa import cli
    from tests.scripts_helpers import tiny_argv

    together = tiny_argv(synthetic_data, tiny_clip, tmp_path / "ckpt", tmp_path / "together", "Brain", "--shot", "1",
                         "--epoch", "2", "--iterate", "0", "1")
    assert cli.main_train_few(together) == 0
    printed = capsys.readouterr().out
    assert "run 2: epoch 2/2" in printed
    heads = [printed.index(f"== Brain --iterate {i}: {tmp_path / 'together' / f'iterate{i}'}") for i in (0, 1)]
    assert heads[0] < heads[1] < printed.rindex("Brain AUC : ")  # each run's final lines after its own heading
    for iterate in (0, 1):
        alone = tiny_argv(synthetic_data, tiny_clip, tmp_path / f"alone{iterate}", tmp_path / f"alone{iterate}", "Brain",
                          "--shot", "1", "--epoch", "2", "--iterate", str(iterate))
        assert cli.main_train_few(alone) == 0
        got = json.loads((tmp_path / "together" / f"iterate{iterate}" / "metrics.json").read_text())
        own = json.loads((tmp_path / f"alone{iterate}" / "metrics.json").read_text())
        assert got["config"]["iterate"] == iterate and got["support"] == own["support"]
        assert got["training"]["best_epoch"] == own["training"]["best_epoch"]
        for key in ("image_auroc", "pixel_auroc"):
            assert got["metrics"][key] == pytest.approx(own["metrics"][key], abs=1e-4)
        flags = json.loads((tmp_path / "together" / f"iterate{iterate}" / "run_config.json").read_text())
        assert flags["iterate"] == [iterate] and flags["output_dir"] == str(tmp_path / "together" / f"iterate{iterate}")
        assert (tmp_path / "ckpt" / f"Brain-1shot-it{iterate}-seed111.pth").is_file()

    # test_few.py --iterate 0 1 tests each split's checkpoint in turn, each in its own folder, with the
    # numbers its training selected; one --checkpoint for several runs is refused before any work
    tested = tiny_argv(synthetic_data, tiny_clip, tmp_path / "ckpt", tmp_path / "tested", "Brain", "--shot", "1",
                       "--iterate", "0", "1")
    assert cli.main_test_few(tested) == 0
    printed = capsys.readouterr().out
    for iterate in (0, 1):
        folder = tmp_path / "tested" / f"iterate{iterate}"
        assert f"== Brain --iterate {iterate}: {folder}" in printed
        trained = json.loads((tmp_path / "together" / f"iterate{iterate}" / "metrics.json").read_text())
        got = json.loads((folder / "metrics.json").read_text())
        assert got["config"]["iterate"] == iterate and got["support"] == trained["support"]
        assert got["metrics"]["image_auroc"] == trained["metrics"]["image_auroc"]
        assert got["metrics"]["pixel_auroc"] == pytest.approx(trained["metrics"]["pixel_auroc"], abs=1e-12)
        assert json.loads((folder / "run_config.json").read_text())["iterate"] == [iterate]
    alone = tiny_argv(synthetic_data, tiny_clip, tmp_path / "ckpt", tmp_path / "tested-alone", "Brain", "--shot", "1",
                      "--iterate", "1")
    assert cli.main_test_few(alone) == 0  # the second run on the shared model equals its run alone, bit for bit
    own = json.loads((tmp_path / "tested-alone" / "metrics.json").read_text())
    got = json.loads((tmp_path / "tested" / "iterate1" / "metrics.json").read_text())
    assert {k: v for k, v in got["metrics"].items() if k != "seconds"} == {
        k: v for k, v in own["metrics"].items() if k != "seconds"}
    assert (tmp_path / "tested" / "iterate1" / "predictions.csv").read_bytes() == (
        tmp_path / "tested-alone" / "predictions.csv").read_bytes()
    one_file = tested + ["--checkpoint", str(tmp_path / "ckpt" / "Brain-1shot-it0-seed111.pth"),
                         "--output_dir", str(tmp_path / "refused")]
    assert cli.main_test_few(one_file) != 0
    assert "--checkpoint names one file and --obj/--iterate give 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_train_zero_with_several_objs_trains_the_targets_in_lockstep(synthetic_data, tiny_clip, tmp_path, capsys):
    """train_zero.py --obj Brain Chest: both zero-shot targets trained together, each in <output_dir>/<obj>
    with its own checkpoint and run_config.json; each equals its own run to float rounding."""
    from mvfa import cli
    from tests.scripts_helpers import tiny_argv

    together = tiny_argv(synthetic_data, tiny_clip, tmp_path / "ckpt", tmp_path / "together", "Brain", "--epoch", "1")
    together[1:2] = ["Brain", "Chest"]
    assert cli.main_train_zero(together) == 0
    assert "run 2: epoch 1/1" in capsys.readouterr().out
    for obj in ("Brain", "Chest"):
        alone = tiny_argv(synthetic_data, tiny_clip, tmp_path / f"alone-{obj}", tmp_path / f"alone-{obj}", obj, "--epoch", "1")
        assert cli.main_train_zero(alone) == 0
        got = json.loads((tmp_path / "together" / obj / "metrics.json").read_text())
        own = json.loads((tmp_path / f"alone-{obj}" / "metrics.json").read_text())
        assert got["config"]["obj"] == obj
        assert (got["training"]["best_epoch"], got["training"]["best_step"]) == (own["training"]["best_epoch"],
                                                                                 own["training"]["best_step"])
        for key in ("image_auroc", "pixel_auroc"):
            assert (got["metrics"].get(key) is None) == (own["metrics"].get(key) is None)
            if own["metrics"].get(key) is not None:
                assert got["metrics"][key] == pytest.approx(own["metrics"][key], abs=1e-4)
        flags = json.loads((tmp_path / "together" / obj / "run_config.json").read_text())
        assert flags["obj"] == [obj] and flags["output_dir"] == str(tmp_path / "together" / obj)
        assert (tmp_path / "ckpt" / f"{obj}-zero-seed111.pth").is_file()

    tested = tiny_argv(synthetic_data, tiny_clip, tmp_path / "ckpt", tmp_path / "tested", "Brain")
    tested[1:2] = ["Brain", "Chest"]
    assert cli.main_test_zero(tested) == 0  # test_zero.py --obj Brain Chest: each target's checkpoint in turn
    printed = capsys.readouterr().out
    for obj in ("Brain", "Chest"):
        assert f"== {obj}: {tmp_path / 'tested' / obj}" in printed
        trained = json.loads((tmp_path / "together" / obj / "metrics.json").read_text())
        got = json.loads((tmp_path / "tested" / obj / "metrics.json").read_text())
        assert got["config"]["obj"] == obj
        assert got["metrics"]["image_auroc"] == pytest.approx(trained["metrics"]["image_auroc"], abs=1e-12)


def test_several_objs_and_iterates_give_each_run_its_folder(tmp_path):
    from mvfa import cli

    parser = cli.build_parser("few-shot", True)
    args = parser.parse_args(["--obj", "Brain", "Chest", "--iterate", "0", "1", "--output_dir", str(tmp_path), "--device", "cpu"])
    configs = cli.configs_from_args(args, "few-shot", True)
    assert [(c.obj, c.iterate, c.output_dir) for c in configs] == [
        (obj, i, tmp_path / obj / f"iterate{i}") for obj in ("Brain", "Chest") for i in (0, 1)]
    one = cli.configs_from_args(parser.parse_args(["--obj", "Brain", "--output_dir", str(tmp_path), "--device", "cpu"]),
                                "few-shot", True)
    assert [(c.obj, c.output_dir) for c in one] == [("Brain", tmp_path)]
    named = parser.parse_args(["--obj", "Knee", "Hip", "--prompt_name", "knee", "--device", "cpu"])
    with pytest.raises(MVFAError, match="--prompt_name names one dataset's object"):
        cli.configs_from_args(named, "few-shot", True)
