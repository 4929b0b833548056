"""Calibration (normalisation statistics and threshold in the checkpoint), mvfa.predict, --normalize and
--save_maps, on a tiny random CLIP and small synthetic data."""
from __future__ import annotations

import csv
import json
from pathlib import Path
import shutil

from PIL import Image
import numpy as np
import pytest
import torch

from CLIP import create_model
from dataset.synthetic import generate_benchmark
from dataset.tensors import TensorSet
from mvfa import cli
from mvfa import predict
from mvfa.calibration.normalization import Normalization
from mvfa.calibration.thresholds import choose_threshold, threshold_metrics
from mvfa.method.evaluation import evaluate, fit_normalization
from mvfa.method.memory_bank import build_memory_bank
from mvfa.method.model import AdaptedViT, read_checkpoint, save_checkpoint
from mvfa.method.scorer import FewShotScorer, ZeroShotScorer
from mvfa.runs.visualize import figure_layout
from mvfa.runtime.errors import MVFAError
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

N_VALID, N_TEST = (6, 6), (5, 5)
SHOT = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip) -> dict:
    """Few-shot adapters for Brain (masks; F1 threshold) and Chest (no masks; FPR threshold)."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    generate_benchmark(data, seed=1, image_size=64, n_valid=N_VALID, n_test=N_TEST, datasets=["Brain", "Chest"])
    clip = tiny_clip  # conftest.py
    runs = {"Brain": ["--epoch", "1"], "Chest": ["--epoch", "0", "--threshold_rule", "fpr", "--target_fpr", "0.25"]}
    checkpoints = {}
    for obj, extra in runs.items():
        argv = tiny_argv(data, clip, root / "ckpt", root / f"train-{obj}", obj, "--shot", str(SHOT), "--select", "last", *extra)
        assert cli.main_train_few(argv) == 0
        checkpoints[obj] = root / "ckpt" / f"{obj}-{SHOT}shot-it0-seed111.pth"
    return {"root": root, "data": data, "clip": clip, "ckpt": checkpoints}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def meta_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def support_folder(trained: dict, obj: str, folder: Path) -> Path:
    """The normal originals of the training support, as predict's --support folder."""
    folder.mkdir()
    for name in meta_of(trained["ckpt"][obj])["support"]["normal"]:
        shutil.copy(trained["data"] / f"{obj}_AD" / "valid" / "good" / "img" / name, folder / name)
    return folder


def flat_test_folder(trained: dict, obj: str, folder: Path) -> tuple[Path, Path | None]:
    """The test split's images in one flat folder (good_<name>, Ungood_<name>), and their masks."""
    split = trained["data"] / f"{obj}_AD" / "test"
    folder.mkdir()
    masks = None
    for kind in ("good", "Ungood"):
        for path in sorted((split / kind / "img").iterdir()):
            shutil.copy(path, folder / f"{kind}_{path.name}")
    if (split / "Ungood" / "anomaly_mask").is_dir():
        masks = folder.parent / f"{folder.name}_masks"
        masks.mkdir()
        for path in sorted((split / "Ungood" / "anomaly_mask").iterdir()):
            shutil.copy(path, masks / f"Ungood_{path.name}")
    return folder, masks


def predict_argv(trained: dict, ckpt: Path, input_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--input", str(input_path), "--output_dir", str(output_dir),
            "--clip_ckpt", str(trained["clip"]), "--device", "cpu", *extra]


def flat_name(path: str) -> str:
    """Brain_AD/test/Ungood/img/0003.png -> Ungood_0003.png (flat_test_folder's names)."""
    parts = Path(path).parts
    return f"{parts[-3]}_{parts[-1]}"


# ------------------------------------------------------------------------------------------------
# Calibration stored in the checkpoint


def test_checkpoint_meta_holds_calibration_as_plain_data(trained):
    brain, chest = meta_of(trained["ckpt"]["Brain"]), meta_of(trained["ckpt"]["Chest"])
    for meta in (brain, chest):
        assert meta["model_name"] == TINY_MODEL and meta["img_size"] == TINY_SIZE
        assert meta["features_list"] == [int(s) for s in TINY_STAGES] and meta["mode"] == "few-shot"
        norm = Normalization.from_dict(meta["normalization"])
        assert norm.count == N_VALID[0] - SHOT and "minus the 4 support images" in norm.source
        assert meta["calibration"]["n_normal"] == N_VALID[0] - SHOT
        assert meta["calibration"]["n_abnormal"] == N_VALID[1] - SHOT
        assert isinstance(meta["threshold"], float)
    assert brain["threshold_rule"] == "f1" and brain["has_masks"] is True
    assert not Normalization.from_dict(brain["normalization"]).missing(FewShotScorer.branches_needed(True))
    assert chest["threshold_rule"] == "fpr" and chest["target_fpr"] == 0.25 and chest["has_masks"] is False
    assert not Normalization.from_dict(chest["normalization"]).missing(FewShotScorer.branches_needed(False))
    assert chest["calibration"]["valid_fpr"] <= 0.25  # at most 1 of the 4 valid normal images flagged
    assert brain["support"]["normal"] and len(brain["support"]["abnormal"]) == SHOT


# ------------------------------------------------------------------------------------------------
# predict equals test_few under the same statistics


@pytest.mark.parametrize("obj, normalize, save_maps", [("Brain", "checkpoint", ["--save_maps", "1"]), ("Chest", "valid", ["--save_maps"])])
def test_predict_equals_test_few(trained, tmp_path, capsys, obj, normalize, save_maps):
    ckpt, meta = trained["ckpt"][obj], meta_of(trained["ckpt"][obj])
    test_out = tmp_path / "test"
    argv = tiny_argv(trained["data"], trained["clip"], trained["root"] / "ckpt", test_out, obj, "--shot", str(SHOT),
                     "--normalize", normalize, *save_maps)
    assert cli.main_test_few(argv) == 0
    expected = {flat_name(row["path"]): float(row["score"]) for row in read_csv(test_out / "predictions.csv")}
    payload = json.loads((test_out / "metrics.json").read_text())
    assert payload["normalization"]["mode"] == normalize
    assert payload["threshold"]["value"] == meta["threshold"] and payload["threshold"]["rule"] == meta["threshold_rule"]
    assert sum(payload["threshold"]["test"][k] for k in ("tp", "fp", "tn", "fn")) == sum(N_TEST)

    # --save_maps: 1 -> the highest and the lowest test image; no number -> every test image.
    index = read_csv(test_out / "maps" / "index.csv")
    assert len(index) == (2 if save_maps[1:] == ["1"] else sum(N_TEST))
    for row in index:
        picture = Image.open(test_out / "maps" / row["file"])
        layout = figure_layout(TINY_SIZE)  # the titled figure: image, map over it, colour bar
        assert picture.size == (layout.width, layout.height)
    if len(index) == 2:
        assert [row["file"].split("_")[0] for row in index] == ["high01", "low01"]
        assert int(index[0]["rank"]) == 1 and int(index[1]["rank"]) == sum(N_TEST)

    images, masks = flat_test_folder(trained, obj, tmp_path / "images")
    support = support_folder(trained, obj, tmp_path / "support")
    out = tmp_path / "predict"
    extra = ["--support", str(support)] + (["--masks", str(masks)] if masks else [])
    capsys.readouterr()
    assert predict.main(predict_argv(trained, ckpt, images, out, *extra)) == 0
    rows = read_csv(out / "predictions.csv")
    assert sorted(Path(row["path"]).name for row in rows) == sorted(expected)
    for row in rows:
        name, score = Path(row["path"]).name, float(row["score"])
        assert score == pytest.approx(expected[name], abs=1e-5), name
        assert row["decision"] == ("abnormal" if score >= meta["threshold"] else "normal")
        picture = np.asarray(Image.open(out / row["overlay"]))
        layout = figure_layout(TINY_SIZE)
        assert picture.shape == (layout.height, layout.width, 3)
        if masks is not None and name.startswith("Ungood"):  # the mask's contour, in green
            assert (picture == [0, 255, 0]).all(axis=-1).any(), name
    summary = json.loads((out / "predict.json").read_text())
    assert summary["mode"] == "few-shot" and summary["threshold"] == meta["threshold"] and summary["failed"] == 0


def test_zero_shot_predict_equals_test_zero(trained, tmp_path, capsys):
    """Without --support the zero-shot branch alone, under the checkpoint's zero-shot statistics."""
    ckpt = trained["ckpt"]["Brain"]
    test_out = tmp_path / "test"
    # test_zero scores zero-shot checkpoints only: the same adapters and statistics, relabelled zero-shot
    # (without the few-shot fusion's threshold)
    state = read_checkpoint(ckpt)
    state["meta"] = {**state["meta"], "mode": "zero-shot", "threshold": None}
    save_checkpoint(state, tmp_path / "as-zero-shot.pth")
    argv = tiny_argv(trained["data"], trained["clip"], tmp_path, test_out, "Brain", "--checkpoint",
                     str(tmp_path / "as-zero-shot.pth"), "--normalize", "checkpoint")
    assert cli.main_test_zero(argv) == 0
    payload = json.loads((test_out / "metrics.json").read_text())
    assert "threshold" not in payload
    expected = {flat_name(row["path"]): float(row["score"]) for row in read_csv(test_out / "predictions.csv")}

    images, _ = flat_test_folder(trained, "Brain", tmp_path / "images")
    capsys.readouterr()
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "threshold is for few-shot scoring" in printed
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[Path(row["path"]).name], abs=1e-5)
        assert row["decision"] == ""
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "out2", "--threshold", "0.5")) == 0
    for row in read_csv(tmp_path / "out2" / "predictions.csv"):
        assert row["decision"] == ("abnormal" if float(row["score"]) >= 0.5 else "normal")


def test_zero_shot_checkpoint_is_calibrated_on_the_target_valid_split(trained, tmp_path, capsys):
    argv = tiny_argv(trained["data"], trained["clip"], tmp_path / "ckpt", tmp_path / "train", "Chest", "--epoch", "0",
                     "--select", "last")
    assert cli.main_train_zero(argv) == 0
    ckpt = tmp_path / "ckpt" / "Chest-zero-seed111.pth"
    meta = meta_of(ckpt)
    assert meta["mode"] == "zero-shot" and "own valid split" in meta["calibration"]["data"]
    norm = Normalization.from_dict(meta["normalization"])
    assert norm.count == N_VALID[0] and norm.missing(ZeroShotScorer.branches_needed(False)) == []
    assert norm.few_score_low is None
    images, _ = flat_test_folder(trained, "Chest", tmp_path / "images")
    capsys.readouterr()
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "out")) == 0
    assert "note:" not in capsys.readouterr().out
    for row in read_csv(tmp_path / "out" / "predictions.csv"):
        assert row["decision"] == ("abnormal" if float(row["score"]) >= meta["threshold"] else "normal")

    # A target without a valid split: no calibration (a note), and predict then uses raw scores.
    data = tmp_path / "data"
    shutil.copytree(trained["data"] / "Brain_AD", data / "Brain_AD")
    shutil.copytree(trained["data"] / "Chest_AD" / "test", data / "Chest_AD" / "test")
    argv = tiny_argv(data, trained["clip"], tmp_path / "ckpt2", tmp_path / "train2", "Chest", "--epoch", "0", "--select", "last")
    assert cli.main_train_zero(argv) == 0
    assert "note: no calibration:" in capsys.readouterr().out
    ckpt = tmp_path / "ckpt2" / "Chest-zero-seed111.pth"
    assert meta_of(ckpt)["normalization"] is None and meta_of(ckpt)["threshold"] is None
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "out2")) == 0
    printed = capsys.readouterr().out
    assert "raw branch values" in printed and "decisions left empty" in printed


# ------------------------------------------------------------------------------------------------
# Release checkpoints (no metadata) and bad input


def release_checkpoint(trained: dict, path: Path) -> Path:
    state = torch.load(trained["ckpt"]["Brain"], weights_only=True)
    save_checkpoint({"seg_adapters": state["seg_adapters"], "det_adapters": state["det_adapters"]}, path)
    return path


def test_release_checkpoint_needs_flags(trained, tmp_path, capsys):
    ckpt = release_checkpoint(trained, tmp_path / "Brain.pth")
    image = trained["data"] / "Brain_AD" / "test" / "Ungood" / "img" / "0000.png"
    code = predict.main(predict_argv(trained, ckpt, image, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    for flag in ("--model_name", "--img_size", "--features_list", "--prompt_name", "--has_masks"):
        assert flag in err
    assert not (tmp_path / "out").exists()

    flags = ["--model_name", TINY_MODEL, "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES,
             "--prompt_name", "Brain", "--has_masks", "1"]
    code = predict.main(predict_argv(trained, ckpt, image, tmp_path / "out", *flags, "--threshold", "0.1"))
    printed = capsys.readouterr().out
    assert code == 0 and "holds no normalisation statistics" in printed
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 1 and rows[0]["decision"] == ("abnormal" if float(rows[0]["score"]) >= 0.1 else "normal")
    assert (tmp_path / "out" / "0000_png_overlay.png").is_file()

    # the test scripts' --normalize checkpoint needs statistics too
    argv = tiny_argv(trained["data"], trained["clip"], tmp_path, tmp_path / "test", "Brain", "--shot", str(SHOT),
                     "--checkpoint", str(ckpt), "--normalize", "checkpoint")
    code = cli.main_test_few(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no normalisation statistics" in err


def test_bad_files_are_reported_and_skipped(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = trained["data"] / "Brain_AD" / "test" / "good" / "img"
    shutil.copy(source / "0000.png", folder / "a.png")
    shutil.copy(source / "0001.png", folder / "c.png")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "b.png").write_bytes((source / "0002.png").read_bytes()[:100])  # truncated
    code = predict.main(predict_argv(trained, trained["ckpt"]["Brain"], folder, tmp_path / "out"))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1, captured.err
    assert [line for line in lines if "notes.txt" in line] == [line for line in lines if line.startswith("skipped notes.txt: not an image")]
    assert len([line for line in lines if "notes.txt" in line]) == 1
    broken = [line for line in lines if "b.png" in line]
    assert len(broken) == 1 and broken[0].startswith("error: cannot read image") and len(lines) == 2
    assert "Traceback" not in captured.err
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [Path(row["path"]).name for row in rows] == ["a.png", "c.png"]
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["failed"] == 1

    for bad, expected in ((tmp_path / "absent", "does not exist"), (folder / "notes.txt", "is not an image")):
        code = predict.main(predict_argv(trained, trained["ckpt"]["Brain"], bad, tmp_path / "out3"))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_saved_memory_bank_gives_the_same_predictions(trained, tmp_path, capsys):
    """--support FOLDER --save_bank PATH, then --bank PATH without the support: the same CSV, bit for bit."""
    images, _ = flat_test_folder(trained, "Brain", tmp_path / "images")
    support = support_folder(trained, "Brain", tmp_path / "support")
    bank = tmp_path / "banks" / "brain-bank.pt"
    ckpt = trained["ckpt"]["Brain"]
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "built", "--support", str(support),
                                     "--save_bank", str(bank), "--no_overlays")) == 0
    assert f"-> {bank}" in capsys.readouterr().out and bank.is_file()
    assert [p.name for p in bank.parent.iterdir()] == [bank.name]  # no temporary file left
    assert predict.main(predict_argv(trained, ckpt, images, tmp_path / "saved", "--bank", str(bank), "--no_overlays")) == 0
    capsys.readouterr()
    assert (tmp_path / "built" / "predictions.csv").read_text() == (tmp_path / "saved" / "predictions.csv").read_text()
    summary = json.loads((tmp_path / "saved" / "predict.json").read_text())
    assert summary["mode"] == "few-shot" and summary["bank"] == str(bank) and summary["support"] is None


def test_saved_memory_bank_bad_uses(trained, tmp_path, capsys):
    """Each misuse of --bank / --save_bank: one line, exit 2, no predictions written."""
    images, _ = flat_test_folder(trained, "Brain", tmp_path / "images")
    support = support_folder(trained, "Brain", tmp_path / "support")
    bank = tmp_path / "bank.pt"
    assert predict.main(predict_argv(trained, trained["ckpt"]["Brain"], images, tmp_path / "ok", "--support", str(support),
                                     "--save_bank", str(bank), "--no_overlays")) == 0
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bank.read_bytes()[:1000])
    cases = [
        (["--bank", str(bank), "--support", str(support)], "Brain", "--bank and --support both given"),
        (["--save_bank", str(tmp_path / "b2.pt")], "Brain", "--save_bank needs --support"),
        (["--bank", str(tmp_path / "absent.pt")], "Brain", "not found: write one with --support"),
        (["--bank", str(corrupt)], "Brain", "is not a readable memory bank"),
        (["--bank", str(trained["ckpt"]["Brain"])], "Brain", "is not a memory bank file"),
        (["--bank", str(bank)], "Chest", "does not match this run: its weights_sha256 is"),  # other adapters
    ]
    capsys.readouterr()
    for index, (extra, obj, expected) in enumerate(cases):
        out = tmp_path / f"out{index}"
        code = predict.main(predict_argv(trained, trained["ckpt"][obj], images, out, *extra))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (extra, err)
        assert "Traceback" not in err and not (out / "predictions.csv").exists()


# ------------------------------------------------------------------------------------------------
# Normalisation and thresholds as functions


@pytest.mark.parametrize("has_masks, few_shot", [(True, True), (False, True), (True, False), (False, False)])
def test_fixed_statistics_of_the_set_reproduce_the_release(has_masks, few_shot):
    """Min-max over a set == fixed statistics fitted on that same set; maps and scores alike."""
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [2, 4]).eval()
    images = (torch.rand(7, 3, TINY_SIZE, TINY_SIZE) * 255).round().to(torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 1])
    data = TensorSet(images, torch.zeros(7, TINY_SIZE, TINY_SIZE, dtype=torch.bool), labels, [f"{i}.png" for i in range(7)])
    text = torch.nn.functional.normalize(torch.randn(64, 2), dim=0)
    if few_shot:
        scorer = FewShotScorer(text, has_masks, build_memory_bank(model, torch.rand(4, 3, TINY_SIZE, TINY_SIZE), 3))
    else:
        scorer = ZeroShotScorer(text, has_masks)
    release = evaluate(model, scorer, data, batch_size=3, metrics=False)
    fitted = fit_normalization(model, scorer, data, batch_size=2)
    assert fitted == Normalization(**{**release.normalization.to_dict(), "source": fitted.source})
    fixed = evaluate(model, scorer, data, fitted, batch_size=2, metrics=False, keep_maps=True, score_under=fitted)
    np.testing.assert_allclose(fixed.image_scores, release.image_scores, atol=1e-6)
    np.testing.assert_array_equal(fixed.fixed_scores, fixed.image_scores)
    if has_masks:
        np.testing.assert_allclose(fixed.maps.numpy(), release.maps.numpy(), atol=1e-6)
    assert fixed.maps.shape == (7, TINY_SIZE, TINY_SIZE)
    # One image alone scores as within the set.
    alone = evaluate(model, scorer, data.subset([4]), fitted, metrics=False)
    assert alone.image_scores[0] == pytest.approx(fixed.image_scores[4], abs=1e-6)
    # Statistics that lack a branch the mode needs: one clear error.
    if few_shot:
        with pytest.raises(MVFAError, match="few_"):
            evaluate(model, scorer, data, Normalization(0.0, 1.0, 0.0, 1.0), metrics=False)


def test_normalization_round_trip_and_bad_entries():
    norm = Normalization(0.1, 0.9, 0.0, 2.0, count=3, source="x")
    assert Normalization.from_dict(norm.to_dict()) == norm
    assert norm.missing(FewShotScorer.branches_needed(True)) == ["few_map"]
    for bad in ({"zero_score_low": "a", "zero_score_high": 1.0}, {"zero_score_low": 0.0, "zero_score_high": 1.0, "x": 1}, [1]):
        with pytest.raises(MVFAError):
            Normalization.from_dict(bad)


def test_choose_threshold_rules():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    f1 = choose_threshold(scores, labels, "f1")
    # best F1 at 0.35 (4 of 4 abnormal, 1 normal flagged: 8/9), placed midway to the next lower score
    assert f1["threshold"] == pytest.approx(0.325) and f1["reference"]["f1"] == pytest.approx(8 / 9)
    assert threshold_metrics(scores, labels, f1["threshold"]) == f1["reference"]
    # FPR: 4 normal images; 0.25 lets one be flagged (0.4), 0.2 none.
    one = choose_threshold(scores, labels, "fpr", 0.25)
    assert 0.3 < one["threshold"] <= 0.4 and one["reference"]["fp"] == 1
    none = choose_threshold(scores, labels, "fpr", 0.2)
    assert none["threshold"] > 0.4 and none["reference"]["fp"] == 0 and none["threshold"] < 0.4000001
    # ties never let more normal images through than allowed
    tied = choose_threshold(np.array([0.5, 0.5, 0.5, 0.1]), np.array([0, 0, 0, 0]), "fpr", 0.4)
    assert tied["reference"]["fp"] == 0
    with pytest.raises(MVFAError, match="normal and abnormal"):
        choose_threshold(scores[:3], labels[:3], "f1")
