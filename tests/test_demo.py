"""python -m mvfa.demo at reduced size, and the overlay drawing."""
from __future__ import annotations

import numpy as np
from PIL import Image

from mvfa import demo
from mvfa.visualize import CONTOUR_COLOUR, display_size, overlay


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


def test_demo_quick_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--datasets", "Brain", "Chest", "--output_dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
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
    # A second run reuses the generated data and the tiny CLIP.
    assert demo.main(["--quick", "--datasets", "Brain", "Chest", "--output_dir", str(out), "--few_epochs", "0",
                      "--zero_epochs", "0", "--device", "cpu"]) == 0
    assert "generated" not in capsys.readouterr().out
