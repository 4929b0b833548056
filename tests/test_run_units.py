"""Pieces of a run on their own: the prefix-cache budget, finding a checkpoint, the overlay
files of --save_maps, --select valid's images, --listings, and a checkpoint's metadata."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from types import SimpleNamespace

from PIL import Image
import numpy as np
import pytest
import torch

from dataset.medical import MedicalDataset, Sample
from mvfa.method.prefix import PrefixBudget
from mvfa.runs.checkpoints import checkpoint_metadata, find_checkpoint
from mvfa.runs.config import RunConfig
from mvfa.runs.outputs import map_overlays
from mvfa.runs.run import read_listings, selection_samples
from mvfa.runtime.errors import MVFAError
from tests.scripts_helpers import TINY_MODEL

CPU = torch.device("cpu")


def config(tmp_path: Path, mode: str = "few-shot", **changes) -> RunConfig:
    return RunConfig(mode=mode, train=False, obj="Brain", data_path=tmp_path / "data", save_path=tmp_path / "ckpt",
                     output_dir=tmp_path / "out", **changes)


def one_line_error(call, *args) -> str:
    with pytest.raises(MVFAError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# PrefixBudget


def test_prefix_budget_on_and_off_ignore_sizes():
    """--prefix_cache on allows every set, off none, whatever their size."""
    on, off = PrefixBudget("on", CPU), PrefixBudget("off", CPU)
    assert [on.allow(n) for n in (0, 10, 1 << 60)] == [True, True, True]
    assert [off.allow(n) for n in (0, 10, 1 << 60)] == [False, False, False]


def test_prefix_budget_auto_spends_until_refusal():
    """auto: a set is allowed while it fits in what remains, which it then uses; a set too large is refused and costs nothing."""
    budget = PrefixBudget("auto", CPU)
    budget.remaining = 100
    assert budget.allow(60) and budget.remaining == 40
    assert not budget.allow(50) and budget.remaining == 40
    assert budget.allow(40) and budget.remaining == 0
    assert not budget.allow(1) and budget.allow(0)


def test_prefix_budget_auto_on_cpu_starts_at_a_quarter_of_ram():
    """auto on the CPU: the budget is a quarter of the machine's memory."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert PrefixBudget("auto", CPU).remaining == int(0.25 * ram)


def test_prefix_budget_unknown_mode_is_one_line():
    """An unknown --prefix_cache value is a one-line error naming the choices."""
    assert one_line_error(PrefixBudget, "always", CPU) == "--prefix_cache 'always' is not known: choose one of auto, on, off"


# ------------------------------------------------------------------------------------------------
# find_checkpoint


def test_explicit_checkpoint_is_used_or_reported_missing(tmp_path):
    """--checkpoint wins over the save path's files when it exists; a missing one is a one-line error naming it."""
    cfg = config(tmp_path)
    cfg.save_path.mkdir()
    (cfg.save_path / "Brain.pth").write_bytes(b"x")
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert find_checkpoint(config(tmp_path, checkpoint=explicit)) == explicit
    message = one_line_error(find_checkpoint, config(tmp_path, checkpoint=tmp_path / "gone.pth"))
    assert message == f"adapter checkpoint not found: {tmp_path / 'gone.pth'} (from --checkpoint)"


def test_our_name_is_preferred_over_the_releases(tmp_path):
    """<obj>-<k>shot-it<i>-seed<s>.pth (few) or <obj>-zero-seed<s>.pth (zero) before <obj>.pth; <obj>.pth alone also serves."""
    few, zero = config(tmp_path, shot=8, iterate=2, seed=5), config(tmp_path, "zero-shot", seed=5)
    few.save_path.mkdir()
    (few.save_path / "Brain.pth").write_bytes(b"x")
    assert find_checkpoint(few) == few.save_path / "Brain.pth"
    for cfg, ours in ((few, "Brain-8shot-it2-seed5.pth"), (zero, "Brain-zero-seed5.pth")):
        (cfg.save_path / ours).write_bytes(b"x")
        assert find_checkpoint(cfg) == cfg.save_path / ours


def test_no_checkpoint_lists_both_names(tmp_path):
    """Neither file: a one-line error naming both file names and the folder."""
    cfg = config(tmp_path)
    message = one_line_error(find_checkpoint, cfg)
    assert message == (f"no adapter checkpoint for Brain in {cfg.save_path}: looked for Brain-4shot-it0-seed111.pth and "
                       "Brain.pth; train first or pass --save_path")


# ------------------------------------------------------------------------------------------------
# map_overlays


S = 16
SCORES = [0.5, 0.9, 0.1, 0.7, 0.3, 0.2]  # rank by score: 3 1 6 2 4 5


def overlay_inputs(tmp_path: Path):
    data_path = tmp_path / "data"
    paths = [data_path / "Brain_AD/test/good/img/n1.png", data_path / "Brain_AD/test/good/img/n2.png",
             data_path / "Brain_AD/test/good/img/n2.jpg", data_path / "Brain_AD/test/Ungood/img/a1.png",
             data_path / "Brain_AD/test/Ungood/img/a2.png", data_path / "Brain_AD/test/Ungood/img/a3.png"]
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = torch.zeros(6, S, S, dtype=torch.bool)
    masks[3:, 4:8, 4:8] = True
    result = SimpleNamespace(image_scores=np.array(SCORES), labels=labels, paths=[str(p) for p in paths],
                             masks=masks, fixed_scores=None)
    data = SimpleNamespace(images=torch.rand(6, 3, S, S, generator=torch.Generator().manual_seed(0)), masks=masks)
    asked: list[list[int]] = []

    def maps_of(indices):
        asked.append(list(indices))
        return torch.rand(len(indices), S, S, generator=torch.Generator().manual_seed(1))

    return result, data, maps_of, asked


def index_rows(folder: Path) -> list[list[str]]:
    with open(folder / "index.csv", newline="") as handle:
        return list(csv.reader(handle))


def test_every_image_gets_a_figure_and_an_index_row(tmp_path):
    """Without N: one figure per test image (same stem, other suffix: the suffix joins the name) and index.csv rows with ranks."""
    result, data, maps_of, asked = overlay_inputs(tmp_path)
    folder = tmp_path / "maps"
    written = map_overlays(config(tmp_path), result, data, maps_of, folder, threshold=0.6, score_is_map_max=True)
    assert asked == [[0, 1, 2, 3, 4, 5]]
    names = ["normal_n1.png", "normal_n2.png", "normal_n2_jpg.png", "abnormal_a1.png", "abnormal_a2.png", "abnormal_a3.png"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "index.csv"])
    rows = index_rows(folder)
    assert rows[0] == ["file", "path", "label", "score", "rank"]
    assert rows[1] == ["normal_n1.png", "Brain_AD/test/good/img/n1.png", "0", "0.50000000", "3"]
    assert [r[4] for r in rows[1:]] == ["3", "1", "6", "2", "4", "5"]
    assert Image.open(written[0]).mode == "RGB"


def test_save_maps_n_draws_the_n_highest_and_lowest(tmp_path):
    """--save_maps 2: the two highest (high01 = best) and the two lowest (low01 = lowest), in that order; the prefix keeps
    n2.png and n2.jpg apart."""
    result, data, maps_of, asked = overlay_inputs(tmp_path)
    folder = tmp_path / "maps"
    written = map_overlays(config(tmp_path, save_maps=2), result, data, maps_of, folder)
    assert asked == [[1, 3, 2, 5]]
    assert [p.name for p in written] == ["high01_normal_n2.png", "high02_abnormal_a1.png", "low01_normal_n2.png",
                                         "low02_abnormal_a3.png"]
    assert [(r[0], r[1], r[4]) for r in index_rows(folder)[1:]] == [
        ("high01_normal_n2.png", "Brain_AD/test/good/img/n2.png", "1"),
        ("high02_abnormal_a1.png", "Brain_AD/test/Ungood/img/a1.png", "2"),
        ("low01_normal_n2.png", "Brain_AD/test/good/img/n2.jpg", "6"),
        ("low02_abnormal_a3.png", "Brain_AD/test/Ungood/img/a3.png", "5"),
    ]


def test_save_maps_n_covering_the_set_draws_every_image(tmp_path):
    """--save_maps 3 of 6 images (2N >= count): every image, unprefixed, in the set's order."""
    result, data, maps_of, asked = overlay_inputs(tmp_path)
    written = map_overlays(config(tmp_path, save_maps=3), result, data, maps_of, tmp_path / "maps")
    assert asked == [[0, 1, 2, 3, 4, 5]] and written[0].name == "normal_n1.png"


def test_a_rank_without_maps_writes_nothing(tmp_path):
    """maps_of giving None (a rank other than 0): no figure, no index, an empty list."""
    result, data, _, _ = overlay_inputs(tmp_path)
    assert map_overlays(config(tmp_path), result, data, lambda indices: None, tmp_path / "maps") == []
    assert not (tmp_path / "maps").exists()


# ------------------------------------------------------------------------------------------------
# selection_samples


def valid_split(root: Path) -> MedicalDataset:
    """Brain_AD/valid: good g1 g2 g3, Ungood u1 u2 (4 x 4 grey PNGs, no masks)."""
    for kind, names in (("good", ["g1", "g2", "g3"]), ("Ungood", ["u1", "u2"])):
        folder = root / "Brain_AD" / "valid" / kind / "img"
        folder.mkdir(parents=True)
        for name in names:
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / f"{name}.png")
    return MedicalDataset.from_root(root / "Brain_AD")


def test_selection_samples_are_the_valid_images_minus_the_support(tmp_path):
    """--select valid: the valid split without the support images, in the split's order."""
    dataset = valid_split(tmp_path)
    valid = dataset.samples("valid")
    chosen = selection_samples(config(tmp_path, shot=1), dataset, [valid[1], valid[3]])
    assert [s.path.name for s in chosen] == ["g1.png", "g3.png", "u2.png"]
    assert [s.label for s in chosen] == [0, 0, 1]


@pytest.mark.parametrize("support, left", [([3, 4], "one class"), ([0, 1, 2, 3, 4], "none")])
def test_selection_samples_need_both_classes(tmp_path, support, left):
    """One class (or nothing) left after the support: a one-line error saying what remains."""
    dataset = valid_split(tmp_path)
    valid = dataset.samples("valid")
    message = one_line_error(selection_samples, config(tmp_path, shot=2), dataset, [valid[i] for i in support])
    assert f"({left})" in message and "Brain besides the 2-shot support" in message
    assert f"{5 - len(support)} remain" in message and "use --select last or a smaller --shot" in message


# ------------------------------------------------------------------------------------------------
# read_listings


def test_read_listings_gives_the_recorded_map(tmp_path):
    """A JSON object of folder -> file names comes back as it is."""
    path = tmp_path / "listings.json"
    path.write_text('{"Brain_AD/test/good/img": ["b.png", "a.png"], "Liver_AD/test/Ungood/img": []}')
    assert read_listings(path) == {"Brain_AD/test/good/img": ["b.png", "a.png"], "Liver_AD/test/Ungood/img": []}


@pytest.mark.parametrize("text", ['{"a": ["x.png"', "\xff\xfe", None])
def test_unreadable_listings_are_one_line(tmp_path, text):
    """Broken JSON, bytes that are no text, or a missing file: one line naming the file and the reason."""
    path = tmp_path / "listings.json"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00")
    elif text is not None:
        path.write_text(text)
    message = one_line_error(read_listings, path)
    assert message.startswith(f"--listings {path} is not a readable JSON file (")


@pytest.mark.parametrize("text", ['["a.png"]', '{"a": "x.png"}', '{"a": [1, 2]}', '{"a": [["x.png"]]}', "3"])
def test_listings_of_the_wrong_shape_are_one_line(tmp_path, text):
    """Anything but an object of lists of strings: one line showing the expected shape."""
    path = tmp_path / "listings.json"
    path.write_text(text)
    message = one_line_error(read_listings, path)
    assert message.startswith(f"--listings {path} must map folder names to lists of file names, e.g. ")


# ------------------------------------------------------------------------------------------------
# checkpoint_metadata


def test_checkpoint_metadata_few_shot(tmp_path, monkeypatch):
    """Few-shot: what the run was trained for, the CLIP weights as an absolute path, and the training settings."""
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, model_name=TINY_MODEL, clip_ckpt=Path("clip.pth"), pretrain="openai", img_size=56,
                 features_list=(2, 4), shot=2, iterate=1, seed=7, select="valid", epoch=3, learning_rate=0.01,
                 batch_size=2, det_loss="bce", quick_gelu=True)
    dataset = MedicalDataset(name="Brain", root=tmp_path / "data" / "Brain_AD", has_masks=True)
    assert checkpoint_metadata(cfg, dataset, "brain") == {
        "format": "mvfa-adapters/1", "mode": "few-shot", "obj": "Brain", "object_word": "brain", "has_masks": True,
        "model_name": TINY_MODEL, "img_size": 56, "features_list": [2, 4], "quick_gelu": True, "shot": 2, "iterate": 1,
        "seed": 7, "select": "valid", "pretrain": "openai", "clip_ckpt": str((tmp_path / "clip.pth").resolve()),
        "epoch": 3, "learning_rate": 0.01, "batch_size": 2, "det_loss": "bce", "order": "release",
        "eval_schedule": "release", "trained": True,
    }


def test_checkpoint_metadata_zero_shot(tmp_path):
    """Zero-shot: shot 0 and iterate -1 whatever the flags; no clip_ckpt is None; the config's own activation."""
    cfg = config(tmp_path, "zero-shot", model_name=TINY_MODEL, pretrain="none", shot=4, iterate=0, order="sorted",
                 eval_schedule="final")
    meta = checkpoint_metadata(cfg, MedicalDataset("Brain", tmp_path, has_masks=False), "brain")
    assert (meta["mode"], meta["shot"], meta["iterate"], meta["has_masks"]) == ("zero-shot", 0, -1, False)
    assert (meta["clip_ckpt"], meta["pretrain"], meta["quick_gelu"]) == (None, "none", False)
    assert (meta["order"], meta["eval_schedule"], meta["features_list"]) == ("sorted", "final", [6, 12, 18, 24])
