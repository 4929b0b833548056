"""The test scripts on ../shared/golden/tiny reproduce the release's AUCs, image scores and maps."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mvfa import cli
from mvfa.runs.run import run

RUNS = [
    ("few-shot", "Brain", True),
    ("few-shot", "Histopathology", False),
    ("zero-shot", "Liver", True),
    ("zero-shot", "Chest", False),
]


def golden_argv(golden_dir, mode: str, obj: str, output_dir) -> list[str]:
    argv = [
        "--obj", obj,
        "--data_path", str(golden_dir / "data"),
        "--model_name", str(golden_dir / "config.json"),
        "--clip_ckpt", str(golden_dir / "clip_jit.pt"),
        "--img_size", "84",
        "--features_list", "2", "4", "6", "8",
        "--seed", "111",
        "--save_path", str(golden_dir / "ckpt" / mode),
        "--output_dir", str(output_dir),
        "--device", "cpu",
    ]
    if mode == "few-shot":
        argv += ["--shot", "4", "--iterate", "0", "--fewshot_seed_dir", str(golden_dir / "fewshot_seed")]
    return argv


@pytest.mark.parametrize("mode, obj, has_masks", RUNS)
def test_test_script_matches_release(golden_dir, tmp_path, capsys, mode, obj, has_masks):
    expected = json.loads((golden_dir / "expected.json").read_text())["runs"][f"{mode}/{obj}"]
    main = cli.main_test_few if mode == "few-shot" else cli.main_test_zero
    assert main(golden_argv(golden_dir, mode, obj, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert f"{obj} AUC : {round(expected['image_AUROC'], 4)}" in printed
    if has_masks:
        assert f"{obj} pAUC : {round(expected['pixel_AUROC'], 4)}" in printed

    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["image_auroc"] == pytest.approx(expected["image_AUROC"], abs=1e-9)
    if has_masks:
        assert metrics["pixel_auroc"] == pytest.approx(expected["pixel_AUROC"], abs=1e-5)

    ours = pd.read_csv(tmp_path / "predictions.csv")
    reference = pd.read_csv(golden_dir / f"expected_{mode}_{obj}_image_scores.csv")
    merged = reference.merge(ours, on="path", suffixes=("_release", "_ours"), validate="one_to_one")
    assert len(merged) == len(reference) == len(ours)
    assert (merged["label_release"] == merged["label_ours"]).all()
    np.testing.assert_allclose(merged["score_ours"], merged["score_release"], atol=2e-5)


@pytest.mark.parametrize("mode, obj", [("few-shot", "Brain"), ("zero-shot", "Liver")])
def test_pixel_maps_match_release(golden_dir, tmp_path, mode, obj):
    parser = cli.build_parser(mode, train=False)
    config = cli.config_from_args(parser.parse_args(golden_argv(golden_dir, mode, obj, tmp_path)), mode, False)
    result = run(config).evaluation
    reference = np.load(golden_dir / f"expected_{mode}_{obj}_pixel_maps.npz")
    order = pd.read_csv(golden_dir / f"expected_{mode}_{obj}_image_scores.csv")["path"].tolist()
    ours_by_path = {str(p).split("/data/", 1)[1]: i for i, p in enumerate(result.paths)}
    index = [ours_by_path[path] for path in order]
    np.testing.assert_array_equal(result.masks.numpy()[index], reference["masks"].astype(bool))
    np.testing.assert_allclose(result.maps.cpu().numpy()[index], reference["maps"], atol=2e-5)
