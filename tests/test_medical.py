"""The data layer: layout, ordering, masks, pixel loading, few-shot support, zero-shot sources."""
from __future__ import annotations

import os
from pathlib import Path
import pickle
import shutil

from PIL import Image, ImageFile
import numpy as np
import pytest
import torch
from torchvision import transforms

from dataset.errors import DatasetError
from dataset.medical import (
    IMAGE_SUFFIXES,
    MASK_FOLDERS,
    ImageSet,
    MedicalDataset,
    Sample,
    Support,
    find_datasets,
    load_image,
    load_mask,
    open_dataset,
    read_seed_file,
    select_support,
    source_datasets_for_zero_shot,
    write_seed_file,
)

SIZE = 16


# --------------------------------------------------------------------------------------------------
# helpers


def _rgb_array(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_png(path: Path, seed: int = 0, h: int = 20, w: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb_array(seed, h, w)).save(path)
    return path


def _write_mask(path: Path, h: int = 20, w: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(mask).save(path)
    return path


def make_dataset(
    data: Path,
    name: str,
    normal: dict[str, list[str]] | None = None,
    abnormal: dict[str, list[str]] | None = None,
    mask_folder: str | None = "anomaly_mask",
) -> Path:
    """Write ``<data>/<name>_AD`` with the given file names per split; masks mirror Ungood names."""
    root = data / f"{name}_AD"
    normal = normal if normal is not None else {"valid": ["n0.png", "n1.png"], "test": ["n0.png", "n1.png"]}
    abnormal = abnormal if abnormal is not None else {"valid": ["a0.png", "a1.png"], "test": ["a0.png", "a1.png"]}
    seed = 0
    for split in ("valid", "test"):
        (root / split / "good" / "img").mkdir(parents=True, exist_ok=True)
        (root / split / "Ungood" / "img").mkdir(parents=True, exist_ok=True)
        for file in normal.get(split, []):
            seed += 1
            _write_png(root / split / "good" / "img" / file, seed)
        for file in abnormal.get(split, []):
            seed += 1
            _write_png(root / split / "Ungood" / "img" / file, seed)
            if mask_folder is not None:
                _write_mask(root / split / "Ungood" / mask_folder / (Path(file).stem + ".png"))
    return root


def _reference(path: Path, size: int) -> torch.Tensor:
    """The release's pipeline computed directly with PIL + torchvision."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return transforms.ToTensor()(img)


# --------------------------------------------------------------------------------------------------
# layout


def test_constants() -> None:
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    assert MASK_FOLDERS == ("anomaly_mask", "label")


def test_find_datasets_sorted_and_mask_flags(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Zeta", mask_folder=None)
    make_dataset(tmp_path, "Brain")
    make_dataset(tmp_path, "Liver", mask_folder="label")
    (tmp_path / "notes_AD.txt").write_text("not a folder")
    (tmp_path / "Other").mkdir()
    found = find_datasets(tmp_path)
    assert list(found) == ["Brain", "Liver", "Zeta"]
    assert found["Brain"] == MedicalDataset("Brain", tmp_path / "Brain_AD", True)
    assert found["Liver"].has_masks is True
    assert found["Zeta"].has_masks is False


def test_find_datasets_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        find_datasets(tmp_path / "nowhere")


def test_open_dataset_lists_present(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Brain")
    make_dataset(tmp_path, "Chest", mask_folder=None)
    assert open_dataset(tmp_path, "Chest").root == tmp_path / "Chest_AD"
    with pytest.raises(DatasetError) as info:
        open_dataset(tmp_path, "Liver")
    message = str(info.value)
    assert str(tmp_path / "Liver_AD") in message and "Brain, Chest" in message
    assert "\n" not in message


def test_samples_order_labels_and_masks(tmp_path: Path) -> None:
    make_dataset(
        tmp_path,
        "Brain",
        normal={"valid": ["b.png", "a.png"], "test": ["z.png", "c.png", "m.png"]},
        abnormal={"valid": ["y.png"], "test": ["02.png", "01.png", "10.png"]},
    )
    ds = open_dataset(tmp_path, "Brain")
    samples = ds.samples("test")
    assert [(s.path.name, s.label) for s in samples] == [
        ("c.png", 0), ("m.png", 0), ("z.png", 0), ("01.png", 1), ("02.png", 1), ("10.png", 1),
    ]
    assert all(s.mask_path is None for s in samples if s.label == 0)
    for s in samples[3:]:
        assert s.mask_path == ds.root / "test" / "Ungood" / "anomaly_mask" / s.path.name
    assert [s.path.name for s in ds.samples("valid")] == ["a.png", "b.png", "y.png"]


def test_samples_without_masks(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Chest", mask_folder=None)
    ds = open_dataset(tmp_path, "Chest")
    assert not ds.has_masks
    assert all(s.mask_path is None for s in ds.samples("test"))


def test_label_mask_folder(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Liver", mask_folder="label")
    ds = open_dataset(tmp_path, "Liver")
    assert ds.has_masks
    abnormal = [s for s in ds.samples("valid") if s.label == 1]
    assert [s.mask_path.parent.name for s in abnormal] == ["label", "label"]


def test_has_masks_from_either_split_and_every_split_needs_them(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Brain", mask_folder=None)
    _write_mask(root / "test" / "Ungood" / "anomaly_mask" / "a0.png")
    _write_mask(root / "test" / "Ungood" / "anomaly_mask" / "a1.png")
    ds = open_dataset(tmp_path, "Brain")
    assert ds.has_masks
    assert ds.samples("test")[-1].mask_path is not None
    with pytest.raises(DatasetError, match=r"valid/Ungood/anomaly_mask is missing"):
        ds.samples("valid")


def test_mask_matched_by_name_not_order(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Brain", abnormal={"valid": ["b.png", "a.png"], "test": ["x.png"]}, mask_folder=None)
    masks = root / "valid" / "Ungood" / "anomaly_mask"
    # an extra mask sorting first must not shift the pairing
    for name in ("0extra.png", "a.png", "b.png"):
        _write_mask(masks / name)
    _write_mask(root / "test" / "Ungood" / "anomaly_mask" / "x.png")
    samples = open_dataset(tmp_path, "Brain").samples("valid")
    pairs = {s.path.name: s.mask_path.name for s in samples if s.label == 1}
    assert pairs == {"a.png": "a.png", "b.png": "b.png"}


def test_mask_matched_by_stem(tmp_path: Path) -> None:
    root = tmp_path / "Retina_AD"
    for split in ("valid", "test"):
        (root / split / "good" / "img").mkdir(parents=True)
        img = root / split / "Ungood" / "img" / "0001.jpeg"
        img.parent.mkdir(parents=True)
        Image.fromarray(_rgb_array(3)).save(img, format="JPEG")
        _write_mask(root / split / "Ungood" / "anomaly_mask" / "0001.png")
    samples = open_dataset(tmp_path, "Retina").samples("test")
    assert samples[0].path.name == "0001.jpeg"
    assert samples[0].mask_path.name == "0001.png"


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Brain", abnormal={"valid": ["0001.png"], "test": ["0002.png", "0003.png"]})
    (root / "test" / "Ungood" / "anomaly_mask" / "0003.png").unlink()
    ds = open_dataset(tmp_path, "Brain")
    with pytest.raises(DatasetError) as info:
        ds.samples("test")
    message = str(info.value)
    assert "0003.png" in message and "anomaly_mask" in message and "mask" in message
    assert "\n" not in message
    assert len(ds.samples("valid")) == 3


def test_missing_split(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Brain")
    shutil.rmtree(root / "valid")
    with pytest.raises(DatasetError, match=r"Brain_AD/valid is missing"):
        open_dataset(tmp_path, "Brain").samples("valid")


@pytest.mark.parametrize("kind", ["good", "Ungood"])
def test_missing_img_folder(tmp_path: Path, kind: str) -> None:
    root = make_dataset(tmp_path, "Chest", mask_folder=None)
    shutil.rmtree(root / "test" / kind / "img")
    with pytest.raises(DatasetError, match=rf"test/{kind}/img is missing"):
        open_dataset(tmp_path, "Chest").samples("test")


def test_empty_split(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Chest", normal={"valid": ["n.png"]}, abnormal={"valid": ["a.png"]}, mask_folder=None)
    with pytest.raises(DatasetError, match=r"Chest_AD/test holds no images"):
        open_dataset(tmp_path, "Chest").samples("test")


def test_unknown_split(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Chest", mask_folder=None)
    with pytest.raises(DatasetError, match="train"):
        open_dataset(tmp_path, "Chest").samples("train")


def test_non_image_files_ignored(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Chest", mask_folder=None)
    img = root / "test" / "good" / "img"
    (img / "notes.txt").write_text("x")
    (img / ".DS_Store").write_bytes(b"\0")
    (img / "._n0.png").write_bytes(b"\0\0")
    (img / "sub.png").mkdir()
    Image.fromarray(_rgb_array(9)).save(img / "UPPER.PNG")
    names = [s.path.name for s in open_dataset(tmp_path, "Chest").samples("test")]
    assert names == ["UPPER.PNG", "n0.png", "n1.png", "a0.png", "a1.png"]


# --------------------------------------------------------------------------------------------------
# pixels


def test_load_image_rgb_png_matches_reference(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "x.png", 1)
    out = load_image(path, SIZE)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.equal(out, _reference(path, SIZE))
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_load_image_grey_png(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(_rgb_array(2)[..., 0]).save(path)
    assert Image.open(path).mode == "L"
    out = load_image(path, SIZE)
    assert torch.equal(out, _reference(path, SIZE))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_load_image_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([_rgb_array(3), np.full((20, 24, 1), 7, np.uint8)], axis=2)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert torch.equal(load_image(path, SIZE), _reference(path, SIZE))
    rgb_path = _write_png(tmp_path / "rgb.png", 3)
    assert torch.equal(load_image(path, SIZE), load_image(rgb_path, SIZE))


def test_load_image_palette(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.fromarray(_rgb_array(4)).convert("P", palette=Image.ADAPTIVE, colors=16).save(path)
    assert Image.open(path).mode == "P"
    assert torch.equal(load_image(path, SIZE), _reference(path, SIZE))


def test_load_image_16bit_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257, 65535, 32896], [1000, 128, 65000, 514]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    # a same-size resize is an identity in PIL, so the scaling is visible directly
    big = np.tile(values, (2, 1))  # 4 x 4
    path = tmp_path / "square.png"
    Image.fromarray(big).save(path)
    out = load_image(path, 4)
    expected = torch.from_numpy(np.rint(big / 257.0).astype(np.uint8)).float() / 255
    for channel in range(3):
        assert torch.equal(out[channel], expected)
    assert out[0, 0, 2] == 1.0 and out[0, 0, 0] == 0.0 and out[0, 0, 1] == 1 / 255
    # and resized: the reference is the 8-bit image of round(v / 257) through the release's pipeline
    ref8 = tmp_path / "ref8.png"
    Image.fromarray(np.rint(big / 257.0).astype(np.uint8)).save(ref8)
    assert torch.equal(load_image(path, SIZE), _reference(ref8, SIZE))


def test_load_image_16bit_tiff(tmp_path: Path) -> None:
    values = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800).astype(np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    out = load_image(path, 6)
    assert torch.equal(out[1], torch.from_numpy(np.rint(values / 257.0).astype(np.uint8)).float() / 255)


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF"), (".tiff", "TIFF")])
def test_load_image_other_formats(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = tmp_path / f"x{suffix}"
    Image.fromarray(_rgb_array(5)).save(path, format=fmt)
    assert torch.equal(load_image(path, SIZE), _reference(path, SIZE))


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image_raises(tmp_path: Path, fmt: str, suffix: str) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    full = tmp_path / f"full{suffix}"
    Image.fromarray(_rgb_array(6, 64, 64)).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cannot read image .*cut") as info:
        load_image(cut, SIZE)
    assert "\n" not in str(info.value)


def test_text_file_named_png_raises(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("this is not an image\n")
    with pytest.raises(DatasetError, match=r"cannot read image .*fake\.png"):
        load_image(path, SIZE)
    with pytest.raises(DatasetError, match=r"fake\.png"):
        load_mask(path, SIZE)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"ghost\.png"):
        load_image(tmp_path / "ghost.png", SIZE)


def test_load_mask_binarised(tmp_path: Path) -> None:
    values = np.array([[0, 255, 255, 0], [0, 0, 255, 255], [0, 0, 255, 255], [255, 0, 0, 0]], np.uint8)
    path = tmp_path / "m.png"
    Image.fromarray(values).save(path)
    out = load_mask(path, 4)
    assert out.shape == (1, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out[0], torch.from_numpy((values > 127).astype(np.float32)))
    big = load_mask(path, 8)
    assert set(big.unique().tolist()) <= {0.0, 1.0}
    # nearest resize of the release
    ref = transforms.ToTensor()(Image.open(path).convert("L").resize((8, 8), Image.NEAREST))
    assert torch.equal(big, (ref > 0.5).float())


def _mask_values(h: int = 6, w: int = 6, on: int = 255) -> np.ndarray:
    values = np.zeros((h, w), np.uint8 if on <= 255 else np.uint16)
    values[1:4, 2:5] = on
    return values


@pytest.mark.parametrize("kind", ["one bit", "rgb equal", "rgba equal", "la", "palette grey", "16 bit", "empty"])
def test_valid_mask_forms_read_alike(tmp_path: Path, kind: str) -> None:
    """Single-channel 0/255 masks in every storage form read as the same 0/1 tensor; an empty mask is allowed."""
    values = _mask_values()
    path = tmp_path / "m.png"
    if kind == "one bit":
        Image.fromarray(values > 0).save(path)
    elif kind == "rgb equal":
        Image.fromarray(np.stack([values] * 3, axis=-1)).save(path)
    elif kind == "rgba equal":
        Image.fromarray(np.stack([values] * 3 + [np.full_like(values, 7)], axis=-1)).save(path)
    elif kind == "la":
        Image.fromarray(np.stack([values, np.full_like(values, 7)], axis=-1), mode="LA").save(path)
    elif kind == "palette grey":
        Image.fromarray(values).convert("P").save(path)
    elif kind == "16 bit":
        Image.fromarray(_mask_values(on=65535)).save(path)
    else:
        values = np.zeros_like(values)
        Image.fromarray(values).save(path)
    assert torch.equal(load_mask(path, 6)[0], torch.from_numpy((values > 0).astype(np.float32)))


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("zero one", "holds values 0, 1: a mask holds only 0 (background) and 255 (anomaly) (a 0/1 mask reads as empty)"),
        ("grey", "holds values 0, 100, 255:"),
        ("many greys", "holds values 0, 1, 2, ..., 253, 254, 255 (256 values)"),
        ("colour", "colour image (its R, G, B channels differ at 9 pixels)"),
        ("16 bit 0/255", "16-bit image holding values 0, 255"),
        ("jpeg", "holds values"),
    ],
)
def test_bad_masks_raise_one_line_naming_file_and_values(tmp_path: Path, kind: str, expected: str) -> None:
    path = tmp_path / ("m.jpg" if kind == "jpeg" else "m.png")
    values = _mask_values()
    if kind == "zero one":
        Image.fromarray(values // 255).save(path)
    elif kind == "grey":
        values[0, 0] = 100
        Image.fromarray(values).save(path)
    elif kind == "many greys":
        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(path)
    elif kind == "colour":
        rgb = np.zeros((6, 6, 3), np.uint8)
        rgb[1:4, 2:5, 0] = 255  # a red lesion
        Image.fromarray(rgb).save(path)
    elif kind == "16 bit 0/255":
        Image.fromarray(values.astype(np.uint16)).save(path)
    else:
        Image.fromarray(np.kron(values, np.ones((5, 5), np.uint8))).save(path, quality=75)  # edges inside 8x8 blocks
    with pytest.raises(DatasetError) as info:
        load_mask(path, 6)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"mask {path} ") and expected in message, message
    assert "--binarize_masks" in message


def test_imageset_stops_on_a_bad_mask_naming_it(tmp_path: Path) -> None:
    """Training and testing read masks through ImageSet: a 0/1 mask stops them with one line naming the file."""
    root = make_dataset(tmp_path, "Brain")
    bad = root / "test" / "Ungood" / "anomaly_mask" / "a1.png"
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 6:12] = 1
    Image.fromarray(mask).save(bad)
    images = ImageSet(open_dataset(tmp_path, "Brain").samples("test"), SIZE)
    images[2]  # a good mask
    with pytest.raises(DatasetError, match=r"^mask .*a1\.png holds values 0, 1: "):
        images[3]


# --------------------------------------------------------------------------------------------------
# ImageSet


def test_imageset_items_and_pickle(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Brain")
    ds = open_dataset(tmp_path, "Brain")
    samples = ds.samples("test")
    images = ImageSet(samples, SIZE)
    assert len(images) == 4
    normal, abnormal = images[0], images[3]
    assert normal["label"] == 0 and abnormal["label"] == 1
    assert normal["image"].shape == (3, SIZE, SIZE) and normal["mask"].shape == (1, SIZE, SIZE)
    assert normal["mask"].sum() == 0 and abnormal["mask"].sum() > 0
    assert abnormal["path"] == str(samples[3].path)
    assert torch.equal(abnormal["image"], load_image(samples[3].path, SIZE))
    assert torch.equal(abnormal["mask"], load_mask(samples[3].mask_path, SIZE))
    clone = pickle.loads(pickle.dumps(images))
    assert torch.equal(clone[3]["image"], abnormal["image"])
    loader = torch.utils.data.DataLoader(images, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].tolist() == [0, 0]


def test_imageset_no_mask_dataset_gives_zero_masks(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Chest", mask_folder=None)
    images = ImageSet(open_dataset(tmp_path, "Chest").samples("test"), SIZE)
    assert all(images[i]["mask"].sum() == 0 for i in range(len(images)))
    assert images[3]["label"] == 1


def test_imageset_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "Brain")
    bad = root / "test" / "Ungood" / "anomaly_mask" / "a1.png"
    _write_mask(bad, h=10, w=10)
    images = ImageSet(open_dataset(tmp_path, "Brain").samples("test"), SIZE)
    images[2]
    with pytest.raises(DatasetError) as info:
        images[3]
    message = str(info.value)
    assert str(bad) in message and "img/a1.png" in message and "10x10" in message and "24x20" in message


# --------------------------------------------------------------------------------------------------
# few-shot support


def _few_shot_data(tmp_path: Path, n: int = 6) -> MedicalDataset:
    make_dataset(
        tmp_path / "data",
        "Brain",
        normal={"valid": [f"n{i:02d}.png" for i in range(n)], "test": ["t.png"]},
        abnormal={"valid": [f"a{i:02d}.png" for i in range(n)], "test": ["u.png"]},
    )
    return open_dataset(tmp_path / "data", "Brain")


def _names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


def test_read_seed_file_tolerates_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "4-shot.txt"
    path.write_text("a-0: x.png y.png\nn-0: p.png q.png\n\n  a-1 :\tz.png   w.png  \r\nn-1:r.png s.png")
    assert read_seed_file(path, 0) == (["x.png", "y.png"], ["p.png", "q.png"])
    assert read_seed_file(path, 1) == (["z.png", "w.png"], ["r.png", "s.png"])
    with pytest.raises(DatasetError, match=r"4-shot\.txt has no a-2/n-2"):
        read_seed_file(path, 2)


@pytest.mark.parametrize(
    "text,line",
    [
        ("a-0: x.png\nbogus line\n", 2),
        ("a-0: x.png\nn-0 x.png\n", 2),
        ("a-0:\nn-0: x.png\n", 1),
        ("a-0: x.png\nn-0: y.png\na-0: z.png\n", 3),
        ("a-0: x.png\n", 1),
    ],
)
def test_read_seed_file_malformed(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "2-shot.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=rf"2-shot\.txt line {line}"):
        read_seed_file(path, 0)


def test_select_support_from_seed_file(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    seeds = tmp_path / "seeds"
    (seeds / "Brain").mkdir(parents=True)
    (seeds / "Brain" / "2-shot.txt").write_text("a-0: a03.png a01.png\nn-0: n05.png n00.png\n")
    support = select_support(ds, 2, 0, 111, [tmp_path / "elsewhere", seeds])
    assert _names(support.abnormal) == ["a03.png", "a01.png"]
    assert _names(support.normal) == ["n05.png", "n00.png"]
    assert all(s.label == 1 and s.mask_path is not None for s in support.abnormal)
    assert all(s.label == 0 and s.mask_path is None for s in support.normal)
    assert str(seeds / "Brain" / "2-shot.txt") in support.source and "a-0" in support.source


def test_select_support_first_seed_dir_wins(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    for folder, a in (("one", "a00.png"), ("two", "a01.png")):
        (tmp_path / folder / "Brain").mkdir(parents=True)
        (tmp_path / folder / "Brain" / "1-shot.txt").write_text(f"a-0: {a}\nn-0: n00.png\n")
    support = select_support(ds, 1, 0, 111, [tmp_path / "one", tmp_path / "two"])
    assert _names(support.abnormal) == ["a00.png"]


def test_select_support_absent_name(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    (tmp_path / "seeds" / "Brain").mkdir(parents=True)
    seed_file = tmp_path / "seeds" / "Brain" / "2-shot.txt"
    seed_file.write_text("a-0: a00.png a99.png\nn-0: n00.png n01.png\n")
    with pytest.raises(DatasetError) as info:
        select_support(ds, 2, 0, 111, [tmp_path / "seeds"])
    message = str(info.value)
    assert str(seed_file) in message and "a99.png" in message and "valid/Ungood/img" in message
    # a normal name must be found among normal images, not abnormal ones
    seed_file.write_text("a-0: a00.png a01.png\nn-0: n00.png a02.png\n")
    with pytest.raises(DatasetError, match=r"a02\.png.*valid/good/img"):
        select_support(ds, 2, 0, 111, [tmp_path / "seeds"])


def test_select_support_count_mismatch(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    (tmp_path / "seeds" / "Brain").mkdir(parents=True)
    (tmp_path / "seeds" / "Brain" / "2-shot.txt").write_text("a-0: a00.png\nn-0: n00.png n01.png\n")
    with pytest.raises(DatasetError, match=r"2-shot\.txt lists 1 abnormal"):
        select_support(ds, 2, 0, 111, [tmp_path / "seeds"])


def test_select_support_malformed_file_is_an_error(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    (tmp_path / "seeds" / "Brain").mkdir(parents=True)
    (tmp_path / "seeds" / "Brain" / "2-shot.txt").write_text("garbage\n")
    with pytest.raises(DatasetError, match="line 1"):
        select_support(ds, 2, 3, 111, [tmp_path / "seeds"])


def test_select_support_missing_iterate_falls_back_to_draw(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path)
    (tmp_path / "seeds" / "Brain").mkdir(parents=True)
    (tmp_path / "seeds" / "Brain" / "2-shot.txt").write_text("a-0: a00.png a01.png\nn-0: n00.png n01.png\n")
    support = select_support(ds, 2, 3, 111, [tmp_path / "seeds"])
    assert support.source.startswith("random draw (seed 111, iterate 3")
    assert "has no line for iterate 3" in support.source
    plain = select_support(ds, 2, 3, 111, [])
    assert (support.abnormal, support.normal) == (plain.abnormal, plain.normal)
    assert "no Brain/2-shot.txt (no seed folders given)" in plain.source
    no_file = select_support(ds, 2, 0, 111, [tmp_path / "nothing"])
    assert no_file.source.startswith("random draw (seed 111, iterate 0") and "no Brain/2-shot.txt" in no_file.source


def test_draw_determinism(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path, n=12)
    first = select_support(ds, 4, 1, 111, [])
    again = select_support(ds, 4, 1, 111, [])
    assert _names(first.abnormal) == _names(again.abnormal) and _names(first.normal) == _names(again.normal)
    other_iterate = select_support(ds, 4, 2, 111, [])
    other_seed = select_support(ds, 4, 1, 112, [])
    assert (_names(first.abnormal), _names(first.normal)) != (_names(other_iterate.abnormal), _names(other_iterate.normal))
    assert (_names(first.abnormal), _names(first.normal)) != (_names(other_seed.abnormal), _names(other_seed.normal))
    assert len(set(_names(first.abnormal))) == 4 and all(n.startswith("a") for n in _names(first.abnormal))
    assert all(n.startswith("n") for n in _names(first.normal))
    # the documented rule, reproduced independently
    rng = np.random.default_rng([111, 2])
    a_order, n_order = rng.permutation(12)[:4], rng.permutation(12)[:4]
    assert _names(first.abnormal) == [f"a{i:02d}.png" for i in a_order]
    assert _names(first.normal) == [f"n{i:02d}.png" for i in n_order]
    # iterate -1 is a draw too, reproducible from the seed, and never reads a seed file
    fresh = select_support(ds, 4, -1, 111, [])
    assert fresh == select_support(ds, 4, -1, 111, [])
    assert fresh.source == "random draw (seed 111, iterate -1)"


def test_shot_validation(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path, n=3)
    with pytest.raises(DatasetError) as info:
        select_support(ds, 4, 0, 111, [])
    message = str(info.value)
    assert "valid/Ungood/img" in message and "3" in message and "4" in message
    with pytest.raises(DatasetError, match="--shot 0"):
        select_support(ds, 0, 0, 111, [])
    with pytest.raises(DatasetError, match="--iterate -2"):
        select_support(ds, 1, -2, 111, [])


def test_seed_file_round_trip(tmp_path: Path) -> None:
    ds = _few_shot_data(tmp_path, n=8)
    drawn = select_support(ds, 4, 5, 7, [])
    seeds = tmp_path / "out"
    path = seeds / "Brain" / "4-shot.txt"
    write_seed_file(path, drawn, 5)
    text = path.read_text()
    assert text.endswith("\n") and text.startswith("# iterate 5: random draw (seed 7") and "\na-5: " in text and "\nn-5: " in text
    assert read_seed_file(path, 5) == (_names(drawn.abnormal), _names(drawn.normal))
    again = select_support(ds, 4, 5, 999, [seeds])
    assert again.abnormal == drawn.abnormal and again.normal == drawn.normal
    assert "seed file" in again.source
    # writing another iterate keeps the first; no temporary files are left behind
    other = select_support(ds, 4, 6, 7, [])
    write_seed_file(path, other, 6)
    assert read_seed_file(path, 5) == (_names(drawn.abnormal), _names(drawn.normal))
    assert read_seed_file(path, 6) == (_names(other.abnormal), _names(other.normal))
    assert sorted(p.name for p in path.parent.iterdir()) == ["4-shot.txt"]
    with pytest.raises(DatasetError, match="iterate -1"):
        write_seed_file(path, other, -1)


def test_seed_file_is_written_whole_with_the_usual_mode(tmp_path: Path, monkeypatch) -> None:
    """The file gets a plain file's mode (not mkstemp's 0o600); a failed write leaves the old file and no temporary."""
    ds = _few_shot_data(tmp_path, n=8)
    path = tmp_path / "out" / "4-shot.txt"
    write_seed_file(path, select_support(ds, 4, 0, 7, []), 0)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    before = path.read_text()

    def broken_replace(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("mvfa.runtime.files.os.replace", broken_replace)  # the one atomic writer, mvfa.runtime.files
    with pytest.raises(OSError, match="disk full"):
        write_seed_file(path, select_support(ds, 4, 1, 7, []), 1)
    assert path.read_text() == before and [p.name for p in path.parent.iterdir()] == ["4-shot.txt"]


def test_support_dataclass_fields() -> None:
    support = Support(abnormal=[], normal=[], source="x")
    assert support.source == "x"


# --------------------------------------------------------------------------------------------------
# zero-shot


def test_zero_shot_sources(tmp_path: Path) -> None:
    for name in ("Brain", "Chest", "Liver"):
        make_dataset(tmp_path, name)
    sources = source_datasets_for_zero_shot(tmp_path, "Chest")
    assert [d.name for d in sources] == ["Brain", "Liver"]
    with pytest.raises(DatasetError, match="Chst_AD"):
        source_datasets_for_zero_shot(tmp_path, "Chst")


def test_zero_shot_needs_another_dataset(tmp_path: Path) -> None:
    make_dataset(tmp_path, "Brain")
    with pytest.raises(DatasetError, match="no dataset besides Brain"):
        source_datasets_for_zero_shot(tmp_path, "Brain")


# --------------------------------------------------------------------------------------------------
# the release's parity fixture


def test_golden_tiny_layout(golden_dir: Path) -> None:
    data = golden_dir / "data"
    found = find_datasets(data)
    assert list(found) == ["Brain", "Chest", "Histopathology", "Liver", "Retina_OCT2017", "Retina_RESC"]
    assert {name for name, d in found.items() if d.has_masks} == {"Brain", "Liver", "Retina_RESC"}
    for dataset in found.values():
        for split in ("valid", "test"):
            samples = dataset.samples(split)
            assert samples and {s.label for s in samples} == {0, 1}
    support = select_support(found["Brain"], 4, 0, 111, [golden_dir / "fewshot_seed"])
    lines = (golden_dir / "fewshot_seed" / "Brain" / "4-shot.txt").read_text().splitlines()
    expected_a = [l for l in lines if l.startswith("a-0:")][0].split(":", 1)[1].split()
    expected_n = [l for l in lines if l.startswith("n-0:")][0].split(":", 1)[1].split()
    assert _names(support.abnormal) == expected_a
    assert _names(support.normal) == expected_n
    assert all(s.path.parent == data / "Brain_AD" / "valid" / "Ungood" / "img" for s in support.abnormal)
    assert all(s.mask_path.parent.name == "anomaly_mask" for s in support.abnormal)
    item = ImageSet(support.abnormal, 24)[0]
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (1, 24, 24)
