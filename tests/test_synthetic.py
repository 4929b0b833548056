"""Synthetic benchmark generator (dataset/synthetic.py): layout, determinism, masks, learnability, CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from dataset import synthetic
from dataset.synthetic import SYNTHETIC_DATASETS, generate_benchmark, main

NAMES = [d.name for d in SYNTHETIC_DATASETS]
MASKED = {"Brain", "Liver", "Retina_RESC"}
SIZE = 64
N_VALID = (12, 12)
N_TEST = (16, 16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    result = generate_benchmark(out, seed=0, image_size=SIZE, n_valid=N_VALID, n_test=N_TEST)
    return out, result


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0


def _load(root: Path, name: str, split: str, sub: str) -> np.ndarray:
    folder = root / f"{name}_AD" / split / sub / "img"
    return np.stack([_grey(folder / f) for f in _files(folder)])


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def test_dataset_table() -> None:
    assert NAMES == ["Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology"]
    assert {d.name for d in SYNTHETIC_DATASETS if d.has_masks} == MASKED
    assert all(d.description for d in SYNTHETIC_DATASETS)


def test_layout_is_exact(bench: tuple[Path, dict]) -> None:
    out, result = bench
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_AD" for n in NAMES)  # no temp leftovers
    assert set(result) == set(NAMES)
    for name in NAMES:
        root = out / f"{name}_AD"
        assert _files(root) == ["test", "valid"]
        for split, (n_norm, n_abn) in (("valid", N_VALID), ("test", N_TEST)):
            assert _files(root / split) == ["Ungood", "good"]
            assert _files(root / split / "good") == ["img"]  # normal images never have masks
            expected_abn = ["anomaly_mask", "img"] if name in MASKED else ["img"]
            assert _files(root / split / "Ungood") == expected_abn
            good = _files(root / split / "good" / "img")
            bad = _files(root / split / "Ungood" / "img")
            assert good == [f"{i:04d}.png" for i in range(n_norm)]
            assert bad == [f"{i:04d}.png" for i in range(n_abn)]
            if name in MASKED:
                assert _files(root / split / "Ungood" / "anomaly_mask") == bad
            assert result[name][split] == {"normal": n_norm, "abnormal": n_abn}
        assert result[name]["has_masks"] == (name in MASKED)
        assert result[name]["written"] is True


def test_image_and_mask_formats(bench: tuple[Path, dict]) -> None:
    out, _ = bench
    for name in NAMES:
        for sub in ("good", "Ungood"):
            im = Image.open(out / f"{name}_AD" / "test" / sub / "img" / "0000.png")
            assert im.size == (SIZE, SIZE)
            assert im.mode in ("RGB", "L")
        if name in MASKED:
            m = Image.open(out / f"{name}_AD" / "test" / "Ungood" / "anomaly_mask" / "0000.png")
            assert m.mode == "L" and m.size == (SIZE, SIZE)
    histo = np.asarray(Image.open(out / "Histopathology_AD" / "test" / "good" / "img" / "0000.png").convert("RGB"))
    assert (histo.max(2).astype(int) - histo.min(2)).mean() > 25  # stained colour, not grey


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_and_other_seed_differs(bench: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = bench
    kwargs = dict(image_size=SIZE, n_valid=(2, 1), n_test=(1, 2))
    generate_benchmark(tmp_path / "a", seed=0, **kwargs)
    generate_benchmark(tmp_path / "b", seed=0, **kwargs)
    generate_benchmark(tmp_path / "c", seed=1, **kwargs)
    a, b, c = (_tree(tmp_path / k) for k in "abc")
    assert a and a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)
    # Each image has its own generator, so a smaller run writes the same first files as the full one.
    assert a == {k: (out / k).read_bytes() for k in a}


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MASKED))
def test_masks_binary_nonempty_and_on_the_lesion(bench: tuple[Path, dict], name: str) -> None:
    out, _ = bench
    root = out / f"{name}_AD"
    normal_mean = np.median(_load(out, name, "valid", "good"), axis=0)
    fractions, contrasts, in_dev, out_dev = [], [], [], []
    for split in ("valid", "test"):
        for f in _files(root / split / "Ungood" / "img"):
            mask = np.asarray(Image.open(root / split / "Ungood" / "anomaly_mask" / f))
            assert set(np.unique(mask)) == {0, 255}
            lesion = mask > 0
            img = _grey(root / split / "Ungood" / "img" / f)
            ring = ndimage.binary_dilation(lesion, iterations=SIZE // 16) & ~lesion
            fractions.append(lesion.mean())
            contrasts.append(abs(img[lesion].mean() - img[ring].mean()))
            dev = np.abs(img - normal_mean)
            in_dev.append(dev[lesion].mean())
            out_dev.append(dev[~lesion].mean())
    # Lesions are large (roughly 3-15 % of the image) and clearly contrasted with their surround.
    assert 0.02 < np.median(fractions) < 0.15 and max(fractions) < 0.25
    assert min(contrasts) > 0.06 and np.median(contrasts) > 0.15
    # Masked pixels are where the image departs from a typical normal image.
    assert np.mean(in_dev) > 1.5 * np.mean(out_dev)


@pytest.mark.parametrize("spec", SYNTHETIC_DATASETS, ids=NAMES)
@pytest.mark.parametrize("size", [48, 100])
def test_generator_contract(spec: synthetic.SyntheticDataset, size: int) -> None:
    for abnormal in (False, True):
        img, mask = spec.generate(np.random.default_rng([5, size, abnormal]), size, abnormal)
        assert img.dtype == np.uint8 and img.shape[:2] == (size, size)
        assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)
        if abnormal and spec.has_masks:
            assert mask is not None and mask.dtype == np.uint8 and mask.shape == (size, size)
            assert set(np.unique(mask)) == {0, 255}
        else:
            assert mask is None


# ------------------------------------------------------------------------------------------------
# Families and learnability
# ------------------------------------------------------------------------------------------------
def _stats(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    g = rgb.mean(2)
    return np.array([g.mean(), g.std(), (rgb.max(2) - rgb.min(2)).mean(),
                     np.abs(np.diff(g, axis=0)).mean(), np.abs(np.diff(g, axis=1)).mean(),
                     g[: SIZE // 2].mean() - g[SIZE // 2:].mean()])


def test_families_differ(bench: tuple[Path, dict]) -> None:
    """Simple image statistics tell the six families apart (nearest centroid, valid -> test)."""
    out, _ = bench
    feats = {name: {split: np.stack([_stats(p) for p in sorted((out / f"{name}_AD" / split / "good" / "img").iterdir())])
                    for split in ("valid", "test")} for name in NAMES}
    allv = np.concatenate([feats[n]["valid"] for n in NAMES])
    mu, sd = allv.mean(0), allv.std(0) + 1e-9
    centroids = np.stack([((feats[n]["valid"] - mu) / sd).mean(0) for n in NAMES])
    correct = total = 0
    for i, name in enumerate(NAMES):
        z = (feats[name]["test"] - mu) / sd
        pred = np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        correct += int((pred == i).sum())
        total += len(z)
    assert correct / total > 0.9
    d = np.sqrt(((centroids[:, None] - centroids[None]) ** 2).sum(-1))
    assert d[~np.eye(len(NAMES), dtype=bool)].min() > 0.75


@pytest.mark.parametrize("name", NAMES)
def test_trivial_detector_finds_anomalies(bench: tuple[Path, dict], name: str) -> None:
    """Per-pixel z-score of the blurred image against the normal valid images, top-1 % mean."""
    out, _ = bench
    blur = lambda x: ndimage.gaussian_filter(x, (0, SIZE / 32, SIZE / 32))  # noqa: E731
    normal = blur(_load(out, name, "valid", "good"))
    mu, sd = normal.mean(0), normal.std(0) + 0.02
    k = SIZE * SIZE // 100

    def score(x: np.ndarray) -> np.ndarray:
        z = np.abs((blur(x) - mu) / sd).reshape(len(x), -1)
        return np.sort(z, axis=1)[:, -k:].mean(1)

    tn, ta = _load(out, name, "test", "good"), _load(out, name, "test", "Ungood")
    y = np.r_[np.zeros(len(tn)), np.ones(len(ta))]
    auroc = roc_auc_score(y, np.r_[score(tn), score(ta)])
    assert auroc > 0.7, f"{name}: image AUROC {auroc:.3f}"


# ------------------------------------------------------------------------------------------------
# Writing: skip / overwrite / atomicity, argument checks
# ------------------------------------------------------------------------------------------------
def test_existing_dataset_skipped_unless_overwrite(tmp_path: Path) -> None:
    kwargs = dict(image_size=SIZE, n_valid=(1, 1), n_test=(1, 1), datasets=["Chest"])
    generate_benchmark(tmp_path, seed=0, **kwargs)
    marker = tmp_path / "Chest_AD" / "marker.txt"
    marker.write_text("keep")
    res = generate_benchmark(tmp_path, seed=1, **kwargs)
    assert marker.exists() and res["Chest"]["written"] is False
    assert res["Chest"]["test"] == {"normal": 1, "abnormal": 1}
    res = generate_benchmark(tmp_path, seed=1, overwrite=True, **kwargs)
    assert not marker.exists() and res["Chest"]["written"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Chest_AD"]


def test_interrupted_run_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_save = synthetic._save_png

    def failing_save(array: np.ndarray, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        real_save(array, path)

    monkeypatch.setattr(synthetic, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate_benchmark(tmp_path, image_size=SIZE, n_valid=(2, 2), n_test=(2, 2), datasets=["Brain"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [
    dict(image_size=8), dict(image_size=64.0), dict(seed=-1), dict(n_valid=(1,)), dict(n_test=(-1, 2)),
    dict(datasets=["Brian"]),
])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_benchmark(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_cli_writes_subset_and_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data_synth"
    argv = ["--out", str(out), "--seed", "3", "--size", "48", "--datasets", "Brain", "Chest",
            "--n-valid", "2", "1", "--n-test", "1", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dataset" in text and "masks" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert lines["Brain"][1:4] == ["yes", "2/1", "1/2"]
    assert lines["Chest"][1:4] == ["no", "2/1", "1/2"]
    assert sorted(p.name for p in out.iterdir()) == ["Brain_AD", "Chest_AD"]
    assert Image.open(out / "Brain_AD" / "valid" / "good" / "img" / "0000.png").size == (48, 48)
    assert main(argv) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(argv + ["--overwrite"]) == 0
    assert "written" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [],
    ["--out", "x", "--bogus"],
    ["--out", "x", "--datasets", "Brian"],
    ["--out", "x", "--size", "8"],
    ["--out", "x", "--seed", "-2"],
    ["--out", "x", "--size", "sixty"],
])
def test_cli_bad_flags_are_argparse_errors(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
