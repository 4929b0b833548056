"""python -m mvfa.demo at reduced size, its closing commands run as printed, and the overlay drawing."""
from __future__ import annotations

import contextlib
import io
import json
import shlex

from PIL import Image
import numpy as np
import pytest

from mvfa import cli
from mvfa import demo
from mvfa import predict
from mvfa.paper import PAPER_AUC, PAPER_AVERAGE, paper_mean
from mvfa.runs.visualize import CONTOUR_COLOUR, display_size, overlay

ENTRY_POINTS = {
    ("python", "train_few.py"): cli.main_train_few,
    ("python", "test_few.py"): cli.main_test_few,
    ("python", "train_zero.py"): cli.main_train_zero,
    ("python", "test_zero.py"): cli.main_test_zero,
    ("python", "-m", "mvfa.predict"): predict.main,
}


def test_overlay_blends_heatmap_and_draws_the_mask_contour():
    image = np.full((3, 56, 56), 0.5, dtype=np.float32)
    mask = np.zeros((56, 56))
    mask[14:42, 14:42] = 1
    anomaly_map = mask.astype(np.float32)
    picture = overlay(image, anomaly_map, mask)
    side = display_size(56)
    assert side == 224 and picture.shape == (side, side, 3) and picture.dtype == np.uint8
    assert tuple(picture[14 * 4, 30 * 4]) == CONTOUR_COLOUR  # the mask's top edge
    corner, centre = picture[2, 2].astype(int), picture[112, 112].astype(int)
    assert corner[2] > corner[0]  # low scores are blue in the jet map
    assert centre[0] > centre[2]  # high scores are red
    assert overlay(image, anomaly_map).shape == (side, side, 3)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One quick demo run on Brain (masks) and Chest (none), its printed output and folder."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = demo.main(["--quick", "--datasets", "Brain", "Chest", "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    return {"out": out, "printed": printed.getvalue()}


def test_demo_quick_run(quick, capsys):
    out, printed = quick["out"], quick["printed"]
    assert "random weights" in printed and "not the paper's accuracy" in printed
    assert "ViT-L-14-336px.pt" in printed  # how to get the real backbone
    table = (out / "results.md").read_text()
    assert "| BrainMRI (Brain) | 78.63 / " in table and "| ChestXray (Chest) | 71.11 / " in table
    assert "- / -" in table  # Chest has no localisation column
    rows = [line for line in table.splitlines() if line.startswith("| BrainMRI")]
    assert rows and "None" not in rows[0] and rows[0].count("/") == 4
    overlays = sorted((out / "overlays").glob("*.png"))
    assert {p.name.split("_")[0] for p in overlays} == {"few-shot", "zero-shot"}
    assert all("_Brain_" in p.name for p in overlays)  # overlays need masks: Chest has none
    for path in overlays:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (224, 224)


def test_average_row_compares_the_same_datasets(quick):
    """The paper's value in the average row is its mean over the datasets the demo averaged, not its six-dataset average."""
    line = next(line for line in (quick["out"] / "results.md").read_text().splitlines() if line.startswith("| average"))
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    assert cells[0] == "average of ChestXray, BrainMRI (zero-shot loc: BrainMRI; 2-shot loc: BrainMRI)"
    want = [paper_mean(("zero-shot", "det"), ["Chest", "Brain"]), PAPER_AUC[("zero-shot", "loc")]["Brain"],
            paper_mean(("4-shot", "det"), ["Chest", "Brain"]), PAPER_AUC[("4-shot", "loc")]["Brain"]]
    assert [float(cell.split(" / ")[0]) for cell in cells[1:]] == pytest.approx(want, abs=0.005)
    assert want[0] == pytest.approx((71.11 + 78.63) / 2) and want[0] != PAPER_AVERAGE[("zero-shot", "det")]


def test_paper_mean_over_all_six_is_the_published_average():
    for column, average in PAPER_AVERAGE.items():
        assert paper_mean(column, PAPER_AUC[column]) == pytest.approx(average, abs=0.005)
    assert paper_mean(("zero-shot", "loc"), ["Chest"]) is None and paper_mean(("zero-shot", "det"), []) is None


def test_closing_commands_run_as_printed(quick, capsys):
    """Every command of the closing lines parses and runs with exit 0 through the scripts' entry points."""
    out, printed = quick["out"], quick["printed"]
    lines = [line[2:] for line in printed.splitlines() if line.startswith("  python ")]
    commands = [shlex.split(line) for line in lines]
    assert [next(k for k in ENTRY_POINTS if tuple(c[: len(k)]) == k)[-1] for c in commands] == [
        "test_few.py", "train_few.py", "train_zero.py", "test_zero.py", "mvfa.predict"]
    for command in commands:
        if command[1] in ("train_few.py", "test_few.py"):  # never the default lists of the paper's BMAD names
            assert command[command.index("--fewshot_seed_dir") + 1] == str(out / "fewshot_seed")
            train = command[1] == "train_few.py"
            args = cli.build_parser("few-shot", train).parse_args(command[2:])
            assert cli.config_from_args(args, "few-shot", train).fewshot_seed_dirs == (out / "fewshot_seed",)
        assert "ViT-Tiny-14" in command or "mvfa.predict" in command
    capsys.readouterr()
    for command in commands:
        key = next(k for k in ENTRY_POINTS if tuple(command[: len(k)]) == k)
        code = ENTRY_POINTS[key](command[len(key):])
        assert code == 0, (command, capsys.readouterr().err)
    # test_few on the demo's checkpoint and support lists gives the demo's few-shot numbers again
    demo_metrics = json.loads((out / "results" / "few-shot" / "Brain" / "metrics.json").read_text())["metrics"]
    again = json.loads((out / "next" / "test_few" / "Brain" / "metrics.json").read_text())["metrics"]
    for key in ("image_auroc", "pixel_auroc"):
        assert again[key] == pytest.approx(demo_metrics[key], abs=1e-6)
    assert (out / "next" / "predict" / "Brain" / "predictions.csv").is_file()


def test_second_run_reuses_data_and_clip(quick, capsys):
    out = quick["out"]
    assert demo.main(["--quick", "--datasets", "Brain", "Chest", "--output_dir", str(out), "--few_epochs", "0",
                      "--zero_epochs", "0", "--device", "cpu"]) == 0
    assert "generated" not in capsys.readouterr().out
