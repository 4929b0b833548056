"""python -m mvfa.reproduce on the synthetic benchmark with the tiny backbone: files, table, resume, no test-label leak."""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path
import re
import shutil

import numpy as np
import pytest
import torch

from dataset.medical import MedicalDataset, Sample
from dataset.synthetic import generate_benchmark
from mvfa import cli
from mvfa import reproduce
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

DATASETS = ("Chest", "Brain")  # the paper's order: ChestXray before BrainMRI; Brain has masks
ROWS = {"Chest": "ChestXray", "Brain": "BrainMRI"}
SPLITS = 2
SETTINGS = ("zero-shot", "1-shot", "1-shot-normal")
COLUMNS = [(s, m) for s in SETTINGS for m in ("det", "loc")]
CELL = re.compile(r"^(?P<paper>-|[\d.]+) / (?P<release>[^/]+) / (?P<leakfree>[^/(]+?)(?: \(n=(?P<n>\d+)(?:; over (?P<over>[^)]+))?\))?$")


def reproduce_argv(data: Path, clip: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_path", str(data), "--output_dir", str(out), "--model_name", TINY_MODEL, "--clip_ckpt", str(clip),
        "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES, "--device", "cpu",
        "--shots", "1", "--splits", str(SPLITS), "--epoch", "2", "--batch_size", "8", "--group_size", "1",
        "--only_normal", *extra,
    ]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_clip) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("reproduce")
        generate_benchmark(root / "data", seed=1, image_size=64, n_valid=(5, 5), n_test=(5, 5), datasets=list(DATASETS))
        clip = tiny_clip  # conftest.py
        out = root / "out"
        assert reproduce.main(reproduce_argv(root / "data", clip, out)) == 0
        yield {"root": root, "data": root / "data", "clip": clip, "out": out}
    finally:
        torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def table_cells(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts and parts[0] in (*ROWS.values(), "average"):
            rows[parts[0]] = parts[1:]
    return rows


def expected_stats(values: list[float]) -> tuple[float, float | None]:
    array = 100 * np.asarray(values)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def check_stats(text: str, values: list[float]) -> None:
    mean, std = expected_stats(values)
    shown = [float(x) for x in text.split("±")]
    assert shown[0] == pytest.approx(mean, abs=0.0051)
    if std is None:
        assert len(shown) == 1, text
    else:
        assert len(shown) == 2 and shown[1] == pytest.approx(std, abs=0.0051), text


def test_every_run_every_cell(done):
    rows = read_csv(done["out"] / "results.csv")
    # per dataset: zero-shot x 2 protocols, then 1-shot and 1-shot normal-only x 2 splits x 2 protocols
    assert len(rows) == len(DATASETS) * (2 + 2 * 2 * SPLITS)
    assert [r["dataset"] for r in rows] == sorted((r["dataset"] for r in rows), key=DATASETS.index)
    for row in rows:
        assert (done["out"] / row["run_dir"] / "metrics.json").is_file()
        assert row["n_images"] == "10" and 0 <= float(row["image_auroc"]) <= 1
        payload = json.loads((done["out"] / row["run_dir"] / "metrics.json").read_text())
        assert payload["normalization"]["mode"] == row["normalize"] == {"release": "test", "leakfree": "valid"}[row["protocol"]]
        if row["protocol"] == "leakfree":
            assert "valid" in payload["normalization"]["source"] and "test" not in payload["normalization"]["source"]
        assert (row["pixel_auroc"] != "") == (row["dataset"] == "Brain")
        assert (row["select"], row["normalize"]) == {
            "release": ("test", "test"), "leakfree": ("valid", "valid")}[row["protocol"]] or row["only_normal"] == "1"
        if row["setting"] == "zero-shot":
            assert row["split"] == "0" and row["support"] == "none (zero-shot)"
        else:
            assert ("iterate 0" if row["split"] == "0" else "iterate 1") in row["support"]
            assert ("normal only" in row["support"]) == (row["only_normal"] == "1")

    cells = table_cells((done["out"] / "results.md").read_text())
    assert list(cells) == ["ChestXray", "BrainMRI", "average"]
    metric_key = {"det": "image_auroc", "loc": "pixel_auroc"}
    for label, row_cells in cells.items():
        assert len(row_cells) == len(COLUMNS)
        for (setting, metric), cell in zip(COLUMNS, row_cells):
            names = [d for d in DATASETS if label in (ROWS[d], "average") and (metric == "det" or d == "Brain")]
            if not names:  # Chest has no masks: no localisation cell, as in the paper
                assert cell == "-"
                continue
            match = CELL.match(cell)
            assert match, cell
            assert match["n"] == str(10 * len(names))
            assert match["over"] == (", ".join(ROWS[d] for d in names) if label == "average" else None)
            paper = {("zero-shot", "det"): {"Chest": 71.11, "Brain": 78.63}, ("zero-shot", "loc"): {"Brain": 90.27}}
            want_paper = [paper.get((setting, metric), {}).get(d) for d in names]
            assert match["paper"] == ("-" if None in want_paper else f"{np.mean(want_paper):.2f}")
            for protocol in ("release", "leakfree"):
                per_split = {}
                for d in names:
                    for r in rows:
                        if (r["dataset"], r["setting"], r["protocol"]) == (d, setting, protocol):
                            per_split.setdefault(int(r["split"]), []).append(float(r[metric_key[metric]]))
                values = [float(np.mean(v)) for _, v in sorted(per_split.items())]
                assert len(values) == (1 if setting == "zero-shot" else SPLITS)
                check_stats(match[protocol], values)


def test_resume_skips_finished_runs(done, capsys):
    out = done["out"]
    victim = out / "runs" / "Brain" / "1-shot" / "leakfree" / "split1" / "metrics.json"
    kept = out / "runs" / "Chest" / "zero-shot" / "release" / "split0" / "metrics.json"
    before_csv = (out / "results.csv").read_text()
    kept_time = kept.stat().st_mtime_ns
    victim.unlink()
    capsys.readouterr()
    assert reproduce.main(reproduce_argv(done["data"], done["clip"], out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == len(read_csv(out / "results.csv")) - 1
    assert "1 runs made" in printed and victim.is_file() and kept.stat().st_mtime_ns == kept_time
    assert len((out / "results.csv").read_text()) > 0 and read_csv(out / "results.csv")[0] == read_csv_text(before_csv)[0]

    # Results made with other settings are not mixed in silently.
    code = reproduce.main(reproduce_argv(done["data"], done["clip"], out)[:-1] + ["--epoch", "3", "--only_normal"])
    assert code == 2 and "other settings" in capsys.readouterr().err


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))




def test_leak_free_never_reads_test_labels(done, tmp_path, monkeypatch):
    """The leak-free protocol again, with the target's test labels and masks swapped until the end: same adapters."""
    current = {}
    real_run, real_samples = reproduce.run_grouped, MedicalDataset.samples

    def tracking_run(config_sets):
        current["target"] = config_sets[0][0].obj
        return real_run(config_sets)

    def poisoned_samples(self, split):
        samples = real_samples(self, split)
        if split != "test" or self.name != current.get("target"):
            return samples
        masks = [s.mask_path for s in samples if s.label == 1]
        return [Sample(s.path, 1 - s.label, None if s.label else (masks[i % len(masks)] if masks else None))
                for i, s in enumerate(samples)]

    monkeypatch.setattr(reproduce, "run_grouped", tracking_run)
    monkeypatch.setattr(MedicalDataset, "samples", poisoned_samples)
    out = tmp_path / "poisoned"
    assert reproduce.main(reproduce_argv(done["data"], done["clip"], out, "--protocols", "leakfree")) == 0
    monkeypatch.undo()

    clean_root, poisoned_root = done["out"] / "runs", out / "runs"
    checkpoints = sorted(p.relative_to(poisoned_root) for p in poisoned_root.rglob("*.pth"))
    assert len(checkpoints) == len(DATASETS) * (1 + SPLITS)  # zero-shot and every 1-shot split
    for relative in checkpoints:
        clean, poisoned = torch.load(clean_root / relative, weights_only=True), torch.load(poisoned_root / relative, weights_only=True)
        assert clean.keys() == poisoned.keys()
        for key in clean:
            if key == "meta":
                assert clean[key] == poisoned[key]  # selected epoch, calibration statistics and threshold
                continue
            for name, tensor in clean[key].items():
                assert torch.equal(tensor, poisoned[key][name]), (relative, key, name)
    for path in poisoned_root.rglob("metrics.json"):
        clean = json.loads((clean_root / path.relative_to(poisoned_root)).read_text())
        poisoned = json.loads(path.read_text())
        assert clean["normalization"] == poisoned["normalization"]  # fitted on valid normal images only
        # the poison reached the final evaluation: swapped labels turn the image AUROC over exactly
        assert poisoned["metrics"]["image_auroc"] == pytest.approx(1 - clean["metrics"]["image_auroc"], abs=1e-12)


def test_test_few_only_normal(done, tmp_path, capsys):
    zero = done["out"] / "runs" / "Brain" / "zero-shot" / "leakfree" / "split0" / "Brain-zero-seed111.pth"
    base = [
        "--obj", "Brain", "--data_path", str(done["data"]), "--model_name", TINY_MODEL, "--clip_ckpt", str(done["clip"]),
        "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES, "--device", "cpu", "--shot", "1",
        "--output_dir", str(tmp_path / "out"), "--save_path", str(tmp_path / "none"),
    ]
    assert cli.main_test_few(base + ["--only_normal"]) == 2
    assert "--zero_shot_ckpt" in capsys.readouterr().err
    assert cli.main_test_few(base + ["--only_normal", "--zero_shot_ckpt", str(zero), "--normalize", "valid"]) == 0
    printed = capsys.readouterr().out
    assert "1 normal valid images, no abnormal image" in printed and "Brain pAUC : " in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    reference = json.loads((done["out"] / "runs" / "Brain" / "1-shot-normal" / "leakfree" / "split0" / "metrics.json").read_text())
    assert metrics["metrics"]["image_auroc"] == reference["metrics"]["image_auroc"]
    assert metrics["config"]["only_normal"] is True
    # the support file is the whole draw (readable; the abnormal line is said to be unused), and a
    # run from it uses the same normal images
    assert "its a-0 line names the drawn abnormal images, not used here" in printed
    written = tmp_path / "out" / "1-shot.txt"
    assert [line.split(":")[0] for line in written.read_text().splitlines()] == ["# iterate 0", "a-0", "n-0"]
    seeds = tmp_path / "seeds" / "Brain"
    seeds.mkdir(parents=True)
    (seeds / "1-shot.txt").write_text(written.read_text())
    again = base[:-4] + ["--output_dir", str(tmp_path / "again"), "--save_path", str(tmp_path / "none"),
                         "--only_normal", "--zero_shot_ckpt", str(zero), "--normalize", "valid",
                         "--fewshot_seed_dir", str(tmp_path / "seeds")]
    assert cli.main_test_few(again) == 0
    assert "seed file" in capsys.readouterr().out
    rerun = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert {k: v for k, v in rerun["metrics"].items() if k != "seconds"} == {
        k: v for k, v in metrics["metrics"].items() if k != "seconds"}


def test_release_protocol_is_the_scripts_run(done, tmp_path):
    """A release-protocol run of reproduce is train_few.py with the same flags, to the bit."""
    argv = tiny_argv(done["data"], done["clip"], tmp_path / "ckpt", tmp_path / "out", "Brain",
                     "--shot", "1", "--epoch", "2", "--batch_size", "8")
    assert cli.main_train_few(argv) == 0
    ours = json.loads((done["out"] / "runs" / "Brain" / "1-shot" / "release" / "split0" / "metrics.json").read_text())
    script = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "image_ap", "pixel_aupro"):
        assert ours["metrics"][key] == script["metrics"][key]
    assert (tmp_path / "out" / "predictions.csv").read_text() == (
        done["out"] / "runs" / "Brain" / "1-shot" / "release" / "split0" / "predictions.csv").read_text()


# ------------------------------------------------------------------------------------------------
# What results.md says it was made with


def test_results_md_names_its_settings_and_does_not_claim_the_paper(done):
    text = (done["out"] / "results.md").read_text()
    title = text.splitlines()[0]
    assert title.startswith("# MVFA results (NOT the paper's settings: ") and "reproduced" not in text.lower().split("\n")[0]
    for part in ("model_name ViT-Tiny-14 (paper: ViT-L-14-336)", "img_size 56 (paper: 240)", "epoch 2 (paper: 50)",
                 "batch_size 8 (paper: 1)", "features_list 2 4 6 8 (paper: 6 12 18 24)",
                 "CLIP weights not OpenAI's published file", "datasets ChestXray, BrainMRI only"):
        assert part in title, part
    made = text[text.index("Made with"):text.index("Each cell")]
    assert "- backbone: ViT-Tiny-14, input 56 px, adapter stages 2 4 6 8" in made
    assert f"- CLIP weights: {done['clip']} (sha256 " in made and "not OpenAI's published file" in made
    assert "- training: epochs 2, batch 8, learning rate 0.001 (k-shot) / 0.0001 (zero-shot)" in made
    assert f"- data: {done['data']}: ChestXray (10 test images), BrainMRI (10 test images); fingerprints (sha256 " in made
    data = reproduce.DataFingerprints(done["data"]).of(["Brain", "Chest"])
    assert f"Brain {data['Brain'][:12]}, Chest {data['Chest'][:12]}" in made
    assert "- k-shot: k = 1, 2 support splits per k" in made
    assert "- protocols: release (--select test --normalize test), leakfree (--select valid --normalize valid)" in made


def paper_like_configs() -> list[dict]:
    base = {"model_name": "ViT-L-14-336", "pretrain": "openai", "img_size": 240, "features_list": [6, 12, 18, 24],
            "epoch": 50, "batch_size": 1, "det_loss": "release", "quick_gelu": None, "clip_ckpt": "w.pt",
            "seed": 111, "precision": "fp16", "data_path": "data"}
    return [{**base, "mode": "few-shot", "learning_rate": 1e-3}, {**base, "mode": "zero-shot", "learning_rate": 1e-4}]


@pytest.mark.parametrize("case,title", [
    ("paper", "# MVFA results (the paper's settings)"),
    ("converted weights", "# MVFA results (not verified as the paper's settings: CLIP weights not OpenAI's published file by "
                          "sha256 (maybe OpenAI's weights: a converted copy has another sha256))"),
    ("five datasets", "# MVFA results (NOT the paper's settings: datasets HIS, ChestXray, OCT17, BrainMRI, LiverCT only (RESC absent))"),
    ("random weights", "# MVFA results (NOT the paper's settings: pretrain none (paper: openai); CLIP weights not OpenAI's "
                       "published file by sha256)"),
    ("zero-shot rate", "# MVFA results (NOT the paper's settings: zero-shot learning rate 0.001 (paper: 0.0001))"),
])
def test_title_rule(monkeypatch, case, title):
    configs, datasets = paper_like_configs(), list(reproduce.PAPER_ROWS)
    openai = case != "converted weights"
    monkeypatch.setattr(reproduce, "weights_identity", lambda config: (
        ("random (--pretrain none)", False) if config["pretrain"] == "none" else ("w.pt", openai)))
    if case == "five datasets":
        datasets = datasets[:-1]
    elif case == "random weights":
        configs = [{**c, "pretrain": "none"} for c in configs]
    elif case == "zero-shot rate":
        configs[1]["learning_rate"] = 1e-3
    args = reproduce.parse_args([])
    _, differ = reproduce.settings_report([], configs, datasets, args)
    assert reproduce.report_title(differ).startswith(title), reproduce.report_title(differ)


def test_weights_identity_checks_the_published_sha256(tmp_path, monkeypatch):
    weights = tmp_path / "ViT-L-14-336px.pt"
    weights.write_bytes(b"weights")
    published = hashlib.sha256(b"weights").hexdigest()

    class Config:
        openai_file, openai_sha256 = "ViT-L-14-336px.pt", published

    monkeypatch.setattr(reproduce, "load_config", lambda name: Config)
    config = {"model_name": "ViT-L-14-336", "pretrain": "openai", "clip_ckpt": str(weights)}
    assert reproduce.weights_identity(config) == (f"{weights} (OpenAI's ViT-L-14-336px.pt, sha256 checked)", True)
    weights.write_bytes(b"other weights")  # a converted or foreign file
    text, ok = reproduce.weights_identity(config)
    assert not ok and "not OpenAI's published file" in text
    assert reproduce.weights_identity({**config, "pretrain": "none"}) == ("random (--pretrain none)", False)


# ------------------------------------------------------------------------------------------------
# The data each run used


def small_argv(data: Path, clip: Path, out: Path) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), "--model_name", TINY_MODEL, "--clip_ckpt", str(clip),
            "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES, "--device", "cpu", "--shots", "1",
            "--splits", "1", "--protocols", "release", "--epoch", "1", "--batch_size", "8"]


def test_finished_runs_on_changed_data_are_refused(tiny_clip, tmp_path, capsys):
    generate_benchmark(tmp_path / "data", seed=1, image_size=64, n_valid=(3, 3), n_test=(3, 3), datasets=["Brain"])
    clip = tiny_clip
    out = tmp_path / "out"
    assert reproduce.main(small_argv(tmp_path / "data", clip, out)) == 0
    run_dir = out / "runs" / "Brain" / "1-shot" / "release" / "split0"
    stored = json.loads((run_dir / "data.json").read_text())
    assert list(stored["datasets"]) == ["Brain"] and stored["data_path"] == str(tmp_path / "data")
    assert stored["datasets"]["Brain"] == reproduce.hash_dataset(tmp_path / "data" / "Brain_AD")
    assert read_csv(out / "results.csv")[0]["data_sha256"] == reproduce.combined_hash(stored["datasets"])

    # the same contents elsewhere, with new mtimes: reused
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "data", copy, copy_function=shutil.copyfile)
    (copy / "Brain_AD" / ".DS_Store").write_bytes(b"finder")  # hidden files do not count
    capsys.readouterr()
    assert reproduce.main(small_argv(copy, clip, out)) == 0
    assert "finished before, skipped" in capsys.readouterr().out

    # one image's contents changed, its size kept: refused with one line
    image = next((copy / "Brain_AD" / "test" / "good" / "img").iterdir())
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    assert reproduce.main(small_argv(copy, clip, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{run_dir} was made on other data (Brain_AD changed under {copy}" in err

    # a run made before fingerprints existed is reused, with a note
    (run_dir / "data.json").unlink()
    assert reproduce.main(small_argv(tmp_path / "data", clip, out)) == 0
    assert "has no data.json (made before data fingerprints): reused, its data unchecked" in capsys.readouterr().out


def test_cuda_graph_on_the_cpu_is_refused_before_any_run(done, tmp_path, capsys):
    out = tmp_path / "graph"
    assert reproduce.main(reproduce_argv(done["data"], done["clip"], out, "--cuda_graph")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--cuda_graph replays the training step from CUDA graphs" in err
    assert not (out / "runs").exists()


def test_zero_shot_fingerprints_every_dataset(tmp_path):
    generate_benchmark(tmp_path / "data", seed=1, image_size=32, n_valid=(2, 2), n_test=(2, 2), datasets=["Brain", "Chest"])
    data = reproduce.DataFingerprints(tmp_path / "data")
    zero = reproduce.Plan("Brain", "zero-shot", 0, False, 0, "release")
    few = reproduce.Plan("Brain", "few-shot", 1, False, 0, "release")
    normal = reproduce.Plan("Brain", "few-shot", 1, True, 0, "release")
    assert list(data.for_plan(zero)) == ["Brain", "Chest"]  # the sources change a zero-shot run
    assert list(data.for_plan(few)) == ["Brain"] and list(data.for_plan(normal)) == ["Brain"]
    assert data.for_plan(zero)["Chest"] != data.for_plan(zero)["Brain"]


def test_protocols_trained_together_equal_one_by_one(done, tmp_path, capsys):
    """The default trains each run's two protocols along one trajectory; --one_by_one trains each alone:
    the same checkpoints, results and per-run files, bit for bit."""
    out = tmp_path / "alone"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture's run used one thread: the same arithmetic
    try:
        assert reproduce.main(reproduce_argv(done["data"], done["clip"], out, "--one_by_one")) == 0
    finally:
        torch.set_num_threads(threads)
    assert "trained together" not in capsys.readouterr().out
    together_root, alone_root = done["out"], out
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in read_csv(root / "results.csv")]
               for root in (together_root, alone_root)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == len(DATASETS) * 2 * (1 + 2 * SPLITS)
    files = sorted(p.relative_to(alone_root) for p in (alone_root / "runs").rglob("*")
                   if p.is_file() and p.suffix in (".pth", ".csv"))
    assert any(p.suffix == ".pth" for p in files) and any(p.name == "train_log.csv" for p in files)
    for relative in files:
        if relative.suffix == ".csv":
            assert (together_root / relative).read_bytes() == (alone_root / relative).read_bytes(), relative
            continue
        alone = torch.load(alone_root / relative, weights_only=True)
        together = torch.load(together_root / relative, weights_only=True)
        for key in ("seg_adapters", "det_adapters"):
            assert all(torch.equal(t, together[key][k]) for k, t in alone[key].items()), relative


def test_run_groups_group_a_setting_across_datasets():
    """Sets (a run's protocols) of one setting are grouped across datasets, up to --group_size, in plan
    order; normal-only runs stay alone and come after the zero-shot group whose checkpoints they read."""
    args = argparse.Namespace(protocols=["release", "leakfree"], shots=[1], splits=2, only_normal=True)
    plans = reproduce.plan_runs(list(DATASETS), args)

    def shape(groups):
        return [[(runs[0][1].dataset, runs[0][1].setting, runs[0][1].split, len(runs)) for runs in group] for group in groups]

    groups = reproduce.run_groups(plans, True, 8)
    zero = [("Chest", "zero-shot", 0, 2), ("Brain", "zero-shot", 0, 2)]
    shots = [(d, "1-shot", s, 2) for d in DATASETS for s in range(2)]
    normal = [[(d, "1-shot-normal", s, 1)] for d in DATASETS for s in range(2) for _ in range(2)]
    assert shape(groups) == [zero, shots] + normal
    assert shape(reproduce.run_groups(plans, True, 3)) == [zero, shots[:3]] + normal[:4] + [shots[3:]] + normal[4:]
    alone = reproduce.run_groups(plans, False, 8)
    assert len(alone) == len(plans) and all(len(group) == 1 and len(group[0]) == 1 for group in alone)
    assert [index for group in alone for runs in group for index, _ in runs] == list(range(1, len(plans) + 1))


def test_splits_in_lockstep_by_default_equal_one_by_one_to_rounding(done, tmp_path, capsys):
    """The default --group_size trains the zero-shot targets, and every dataset's k-shot splits, in
    lockstep: every run's AUROCs equal the one-by-one runs' (the fixture's, --group_size 1) to 1e-4,
    with the same selected epochs."""
    out = tmp_path / "lockstep"
    argv = [a for a in reproduce_argv(done["data"], done["clip"], out)]
    at = argv.index("--group_size")
    del argv[at : at + 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert reproduce.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert f"(trained together: {len(DATASETS) * SPLITS} splits in lockstep" in printed  # every dataset's k-shot splits
    assert f"(trained together: {len(DATASETS)} targets in lockstep" in printed  # the zero-shot targets
    lockstep, alone = read_csv(out / "results.csv"), read_csv(done["out"] / "results.csv")
    assert [r["run_dir"] for r in lockstep] == [r["run_dir"] for r in alone]
    for got, own in zip(lockstep, alone):
        for key in ("image_auroc", "pixel_auroc", "image_ap"):
            if own[key]:
                assert float(got[key]) == pytest.approx(float(own[key]), abs=1e-4), (own["run_dir"], key)
        selected = [json.loads((root / r["run_dir"] / "metrics.json").read_text()).get("training", {}).get("best_epoch")
                    for root, r in ((out, got), (done["out"], own))]
        assert selected[0] == selected[1], own["run_dir"]
