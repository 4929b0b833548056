"""The data layer: the release's BMAD folder layout, image/mask loading and the few-shot support.

Layout (METHOD.md section 6)::

    <data>/<Name>_AD/{valid,test}/{good,Ungood}/img/<file>
    <data>/<Name>_AD/{valid,test}/Ungood/{anomaly_mask|label}/<same file name>   (datasets with masks)

Everything here is independent of the model code; it only produces file lists and tensors.
Every bad input raises :class:`dataset.errors.DatasetError` with a one-line message that names the
offending path (or flag) and says what to do.

Decisions (each is repeated where it applies):

* Image files are recognised by suffix (:data:`IMAGE_SUFFIXES`, case-insensitive); hidden files
  (names starting with ``.``, e.g. macOS ``._0001.png``), other suffixes and sub-folders are ignored.
* Samples are ordered normal (``good``) first, then abnormal (``Ungood``), each sorted by file name
  (plain string order), as the release does.
* A dataset has pixel masks when the ``Ungood`` folder of *either* split holds a mask folder
  (:data:`MASK_FOLDERS`, ``anomaly_mask`` preferred over ``label`` when both exist). A dataset with
  masks then needs masks in *every* split that has abnormal images: a split missing its mask folder
  is an error rather than a silent switch to "no masks" for that split.
* Masks are matched to images by file name, falling back to the stem (``0001.jpeg`` -> ``0001.png``)
  when the exact name is absent; never by path string replacement or listing order. Extra mask
  files without an image are ignored.
* A mask is a single-channel image (or RGB with equal channels; alpha ignored) holding only 0
  (background) and 255 (anomaly), or 0 and 65535 in a 16-bit file; see :func:`mask_array`. Any other
  value (a 0/1 mask, grey levels, JPEG noise, colour) stops the run with one line naming the file
  and the values found, rather than being read as (partly) empty as the release would.
  ``python -m dataset.prepare --binarize_masks`` converts such masks explicitly. An all-zero mask of
  an abnormal image is accepted here (the image keeps its image-level label and adds no anomalous
  pixel); ``dataset.prepare`` warns about it.
* Image pixels follow the release exactly for 8-bit data (RGB conversion, bicubic resize to
  (size, size), ToTensor in [0, 1], no mean/std normalisation); 16-bit greyscale is scaled to 8 bit
  first (see :func:`load_image`), where the release would clip it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import re
import struct
from typing import Sequence
import zlib

from PIL import Image
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.errors import DatasetError
from mvfa.runtime.files import write_text_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "is_image_name",
    "folder_entries",
    "MaskIndex",
    "MASK_FOLDERS",
    "SPLITS",
    "Sample",
    "MedicalDataset",
    "find_datasets",
    "open_dataset",
    "load_image",
    "load_mask",
    "mask_array",
    "open_checked",
    "MASK_ON",
    "ImageSet",
    "read_seed_file",
    "write_seed_file",
    "Support",
    "select_support",
    "source_datasets_for_zero_shot",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes read as images, compared case-insensitively."""

MASK_FOLDERS: tuple[str, ...] = ("anomaly_mask", "label")
"""Mask folder names inside ``<split>/Ungood``, in order of preference (BMAD itself uses ``label``)."""

MASK_ON = 255
"""The anomaly value of an 8-bit mask (background: 0); the release reads ``value / 255 > 0.5``."""
MASK_ON_16BIT = 65535
"""The anomaly value of a 16-bit mask (scaled to :data:`MASK_ON` like 16-bit images)."""
_SHOWN_VALUES = 6  # at most this many distinct mask values are listed in an error (then elided)

SPLITS: tuple[str, ...] = ("valid", "test")
DATASET_SUFFIX = "_AD"
SEED_COMMENT = "#"  # a comment line in a seed file (the support's origin, written by the scripts)
NORMAL_DIR = "good"
ABNORMAL_DIR = "Ungood"
IMAGE_DIR = "img"

# Exceptions Pillow raises for unreadable, truncated or corrupt files (plugins differ in what they raise).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


# --------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Sample:
    """One image of a split: ``label`` is 0 for normal (``good``), 1 for abnormal (``Ungood``)."""

    path: Path
    label: int
    mask_path: Path | None = None


def is_image_name(path: Path) -> bool:
    """Whether ``path``'s suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def folder_entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other entries) directly inside ``folder``, each sorted by file name.

    Image files are regular files (or links to them) with an image suffix; the other entries are
    what is neither an image file, a folder nor hidden: files of other types, FIFOs, devices, broken
    links (opening a FIFO named like an image would wait for a writer forever, so it is no image).
    """
    images, others = [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        if is_image_name(path) and path.is_file():
            images.append(path)
        elif not path.is_dir():
            others.append(path)
    return images, others


def _image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by file name."""
    return folder_entries(folder)[0]


def _mask_folder(ungood: Path) -> Path | None:
    """The first of :data:`MASK_FOLDERS` that exists as a folder in ``ungood``."""
    for name in MASK_FOLDERS:
        candidate = ungood / name
        if candidate.is_dir():
            return candidate
    return None


def _detect_has_masks(root: Path) -> bool:
    """True iff ``<root>/<split>/Ungood/{anomaly_mask|label}`` exists for either split."""
    return any(_mask_folder(root / split / ABNORMAL_DIR) is not None for split in SPLITS)


class MaskIndex:
    """Looks masks up by image file name, then by stem (so ``0001.jpeg`` may use ``0001.png``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for path in _image_files(folder):
            self.by_name[path.name] = path
            self.by_stem.setdefault(path.stem, []).append(path)

    def lookup(self, image: Path) -> Path | None:
        """The mask named like ``image``, else the one mask of its stem; None when there is none or
        several of its stem."""
        exact = self.by_name.get(image.name)
        if exact is not None:
            return exact
        candidates = self.by_stem.get(image.stem, [])
        return candidates[0] if len(candidates) == 1 else None

    def find(self, image: Path) -> Path:
        """:meth:`lookup`, with a :class:`DatasetError` saying what is missing instead of None."""
        found = self.lookup(image)
        if found is not None:
            return found
        candidates = self.by_stem.get(image.stem, [])
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise DatasetError(
                f"{self.folder / image.name} is missing and several masks share its stem ({names}): "
                f"keep one mask named like the image {image}"
            )
        raise DatasetError(
            f"{self.folder / image.name} is missing: every abnormal image of a dataset with masks "
            f"needs a mask of the same file name (image {image})"
        )


@dataclass(frozen=True)
class MedicalDataset:
    """One ``<Name>_AD`` folder: ``name`` is ``"Brain"``, ``root`` is ``.../Brain_AD``.

    ``has_masks`` follows the release's rule (a dataset has pixel masks when its ``Ungood`` mask
    folder exists); here either split's ``Ungood/anomaly_mask`` or ``Ungood/label`` counts, and
    :meth:`samples` then insists on masks in every split that has abnormal images.
    """

    name: str
    root: Path
    has_masks: bool

    @classmethod
    def from_root(cls, root: Path | str) -> "MedicalDataset":
        """Describe the dataset folder ``root`` (named ``<Name>_AD``)."""
        root = Path(root)
        name = root.name[: -len(DATASET_SUFFIX)] if root.name.endswith(DATASET_SUFFIX) else root.name
        return cls(name=name, root=root, has_masks=_detect_has_masks(root))

    def samples(self, split: str) -> list[Sample]:
        """The images of ``split`` (``"valid"`` or ``"test"``): good first, then Ungood, each sorted by name.

        Abnormal samples of a dataset with masks carry their mask path (matched by file name, else
        by stem). A split with images of only one class is allowed here; a split without any image
        is an error.
        """
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r} for {self.root}: use one of {', '.join(SPLITS)}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"{split_dir} is missing: a dataset folder needs {split}/good/img and {split}/Ungood/img"
            )
        folders = {}
        for kind in (NORMAL_DIR, ABNORMAL_DIR):
            folder = split_dir / kind / IMAGE_DIR
            if not folder.is_dir():
                raise DatasetError(
                    f"{folder} is missing: every split needs good/img (normal) and Ungood/img (abnormal) folders"
                )
            folders[kind] = _image_files(folder)
        normal, abnormal = folders[NORMAL_DIR], folders[ABNORMAL_DIR]
        if not normal and not abnormal:
            raise DatasetError(
                f"{split_dir} holds no images: put {'/'.join(IMAGE_SUFFIXES)} files into good/img and Ungood/img"
            )

        masks: MaskIndex | None = None
        if self.has_masks and abnormal:
            folder = _mask_folder(split_dir / ABNORMAL_DIR)
            if folder is None:
                raise DatasetError(
                    f"{split_dir / ABNORMAL_DIR / MASK_FOLDERS[0]} is missing: {self.name} has masks in another "
                    f"split, so every split needs a mask for each abnormal image (or remove all mask folders)"
                )
            masks = MaskIndex(folder)

        out = [Sample(path=p, label=0, mask_path=None) for p in normal]
        out += [Sample(path=p, label=1, mask_path=masks.find(p) if masks else None) for p in abnormal]
        return out


def find_datasets(data_path: Path | str) -> dict[str, MedicalDataset]:
    """Every ``<Name>_AD`` folder directly under ``data_path``, keyed by ``Name`` and sorted by it."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise DatasetError(
            f"data folder {data_path} does not exist: pass the folder that holds the <Name>_AD dataset folders"
        )
    found = {}
    for child in sorted(data_path.iterdir(), key=lambda p: p.name):
        if child.is_dir() and child.name.endswith(DATASET_SUFFIX) and len(child.name) > len(DATASET_SUFFIX):
            dataset = MedicalDataset.from_root(child)
            found[dataset.name] = dataset
    return found


def open_dataset(data_path: Path | str, name: str) -> MedicalDataset:
    """The dataset ``name`` under ``data_path``; the error lists the datasets that are present."""
    found = find_datasets(data_path)
    if name not in found:
        present = ", ".join(found) or "none"
        raise DatasetError(
            f"{Path(data_path) / (name + DATASET_SUFFIX)} does not exist: choose one of the datasets present ({present})"
        )
    return found[name]


def source_datasets_for_zero_shot(data_path: Path | str, target: str) -> list[MedicalDataset]:
    """Every dataset under ``data_path`` except ``target`` (sorted by name).

    The target must itself be present: otherwise a misspelt target would silently put the real
    target into the training sources.
    """
    open_dataset(data_path, target)
    sources = [d for name, d in find_datasets(data_path).items() if name != target]
    if not sources:
        raise DatasetError(
            f"{data_path} holds no dataset besides {target}: zero-shot training needs at least one other <Name>_AD folder"
        )
    return sources


# --------------------------------------------------------------------------------------------------
# Pixels


def open_checked(path: Path | str) -> Image.Image:
    """Open and fully decode ``path`` (Pillow decodes lazily, so truncation shows only on ``load``);
    an unreadable file raises DatasetError naming it."""
    return _open_checked(path)


def _open_checked(path: Path | str) -> Image.Image:
    """Open and fully decode ``path`` (Pillow decodes lazily, so truncation shows only on ``load``)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {str(exc) or type(exc).__name__}") from exc


def _to_8bit(img: Image.Image, path: Path | str) -> Image.Image:
    """Scale 16-bit greyscale (modes ``I;16*`` and ``I``) to 8-bit ``L``: ``round(v / 257)``, so 65535 -> 255.

    Mode ``I`` is what some Pillow versions give for 16-bit PNGs, so it is read as 16-bit data too
    (values clipped to 0..65535 first). 32-bit float images (``F``) have no agreed range and are refused.
    Pillow's own conversion would clip 16-bit values at 255 (the release's behaviour), turning
    nearly every pixel white.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.float64)
        scaled = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    if img.mode == "F":
        raise DatasetError(
            f"cannot read image {path}: 32-bit float images (mode F) are not supported, save it as 8- or 16-bit"
        )
    return img


def _rgb_tensor(img: Image.Image, size: int, path: Path | str) -> torch.Tensor:
    """RGB conversion (alpha dropped, as Pillow's convert does), bicubic resize, ToTensor."""
    rgb = _to_8bit(img, path).convert("RGB").resize((size, size), Image.BICUBIC)
    array = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def _is_16bit(img: Image.Image) -> bool:
    return img.mode.startswith("I;16") or img.mode == "I"


def _values_text(values: np.ndarray) -> str:
    """'0, 1' or '0, 3, 7, ..., 254, 255 (200 values)': the distinct values of a mask, for an error line."""
    shown = [str(int(v)) for v in values]
    if len(shown) <= _SHOWN_VALUES:
        return ", ".join(shown)
    half = _SHOWN_VALUES // 2
    return ", ".join(shown[:half] + ["..."] + shown[-half:]) + f" ({len(shown)} values)"


MASK_ADVICE = "save it with 0 and 255 only (python -m dataset.prepare --binarize_masks converts a folder of masks)"
"""What a bad mask's error line tells to do (dataset.prepare, which can convert, says its own)."""


def mask_array(img: Image.Image, path: Path | str, advice: str = MASK_ADVICE) -> np.ndarray:
    """The pixels of a decoded mask as a uint8 array [H, W] of 0 and :data:`MASK_ON`; a bad mask raises.

    What a mask is: a single-channel image (modes ``1``, ``L``, ``LA`` with the alpha ignored, or
    a palette / RGB / RGBA image whose R, G and B channels are equal, alpha ignored) whose values are
    only 0 (background) and 255 (anomaly); in a 16-bit file 0 and 65535. An all-zero mask is allowed.
    Anything else raises :class:`DatasetError` naming the file and the values found: the release
    would read a 0/1 mask (or grey levels up to 127) as empty and grey levels above 127 as anomaly,
    which silently gives wrong pixel metrics. The check is one pass over the decoded pixels.
    ``advice`` ends the error line (what to do).
    """
    fix = advice
    if _is_16bit(img):
        raw = np.asarray(img)
        values = np.unique(raw)
        if not set(values.tolist()) <= {0, MASK_ON_16BIT}:
            raise DatasetError(
                f"mask {path} is a 16-bit image holding values {_values_text(values)}: a mask holds only 0 (background) "
                f"and {MASK_ON_16BIT} (anomaly) in 16 bit, or 0 and {MASK_ON} in 8 bit; {fix}"
            )
        return np.where(raw == MASK_ON_16BIT, MASK_ON, 0).astype(np.uint8)
    if img.mode == "F":
        raise DatasetError(f"mask {path} is a 32-bit float image (mode F): save it as an 8-bit image with 0 and {MASK_ON} only")
    if img.mode in ("1", "L"):
        grey = np.asarray(img.convert("L"))
    elif img.mode == "LA":
        grey = np.asarray(img.getchannel("L"))
    else:
        rgb = np.asarray(img.convert("RGB"))
        differ = int(np.count_nonzero((rgb[..., 0] != rgb[..., 1]) | (rgb[..., 0] != rgb[..., 2])))
        if differ:
            raise DatasetError(
                f"mask {path} is a colour image (its R, G, B channels differ at {differ} pixels): a mask is single-channel "
                f"(or RGB with equal channels) with 0 (background) and {MASK_ON} (anomaly) only; {fix}"
            )
        grey = rgb[..., 0]
    values = np.flatnonzero(np.bincount(grey.ravel(), minlength=MASK_ON + 1))
    if not set(values.tolist()) <= {0, MASK_ON}:
        if set(values.tolist()) <= {0, 1}:
            why = "a 0/1 mask reads as empty"
        else:
            why = "grey levels would read as background up to 127 and as anomaly above"
        raise DatasetError(
            f"mask {path} holds values {_values_text(values)}: a mask holds only 0 (background) and {MASK_ON} (anomaly) "
            f"({why}); {fix}"
        )
    return np.ascontiguousarray(grey, dtype=np.uint8)


def _mask_tensor(img: Image.Image, size: int, path: Path | str) -> torch.Tensor:
    """A checked mask (:func:`mask_array`), nearest-resized, as [1, size, size] floats 0/1 (the release's reading)."""
    grey = Image.fromarray(mask_array(img, path), mode="L").resize((size, size), Image.NEAREST)
    array = np.array(grey, dtype=np.uint8)
    return torch.from_numpy(array > MASK_ON // 2).float().unsqueeze(0)


def load_image(path: Path | str, size: int) -> torch.Tensor:
    """The release's preprocessing: float tensor [3, size, size] in [0, 1].

    PIL open, ``convert("RGB")``, ``resize((size, size), BICUBIC)``, then ToTensor (``/ 255``); no
    mean/std normalisation and no EXIF rotation, as in the release. Additions:

    * 16-bit greyscale is scaled to 8 bit by ``round(v / 257)`` (65535 -> 255) before RGB conversion.
    * RGBA / LA: the alpha channel is dropped (Pillow's ``convert("RGB")``, what the release does);
      colour under transparent pixels is kept, not composited.
    * Palette (``P``) images become RGB through their palette.
    * Unreadable, truncated or non-image files raise DatasetError naming the file. Truncation is
      detected because the file is decoded inside the check; ``ImageFile.LOAD_TRUNCATED_IMAGES``
      must stay off (it is never set here).
    """
    return _rgb_tensor(_open_checked(path), size, path)


def load_mask(path: Path | str, size: int) -> torch.Tensor:
    """The release's mask preprocessing: float tensor [1, size, size] of 0/1.

    PIL open, nearest resize, ``/ 255``, binarised at ``> 0.5``, after checking that the mask holds
    only 0 and 255 (0 and 65535 in 16 bit; :func:`mask_array`): a 0/1 or grey mask, which the release
    would read as (partly) empty, raises DatasetError naming the file and its values.
    """
    return _mask_tensor(_open_checked(path), size, path)


class ImageSet(Dataset):
    """Samples as tensors: ``{"image": [3,S,S], "mask": [1,S,S], "label": int, "path": str}``.

    Normal images and datasets without masks get an all-zero mask. A mask must have its image's
    original size and hold only 0 and 255 (:func:`mask_array`), both checked once per decoding,
    before resizing. Holds only paths, so it pickles for worker processes.
    """

    def __init__(self, samples: Sequence[Sample], img_size: int) -> None:
        if img_size < 1:
            raise DatasetError(f"image size {img_size} is invalid: --img_size must be a positive number of pixels")
        self.samples = list(samples)
        self.img_size = int(img_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        size = self.img_size
        image = _open_checked(sample.path)
        if sample.mask_path is not None:
            mask_img = _open_checked(sample.mask_path)
            if mask_img.size != image.size:
                raise DatasetError(
                    f"mask {sample.mask_path} is {mask_img.size[0]}x{mask_img.size[1]} but its image "
                    f"{sample.path} is {image.size[0]}x{image.size[1]}: a mask must have its image's size"
                )
            mask = _mask_tensor(mask_img, size, sample.mask_path)
        else:
            mask = torch.zeros(1, size, size)
        return {
            "image": _rgb_tensor(image, size, sample.path),
            "mask": mask,
            "label": int(sample.label),
            "path": str(sample.path),
        }


# --------------------------------------------------------------------------------------------------
# Few-shot support

_SEED_LINE = re.compile(r"^\s*([an])\s*-\s*(\d+)\s*:(.*)$")


def _parse_seed_file(path: Path) -> dict[int, tuple[list[str], list[str]]]:
    """All iterates of a seed file: ``{i: (abnormal names, normal names)}``.

    Lines are ``a-<i>: f1 f2 ...`` and ``n-<i>: ...`` (any whitespace; blank lines and ``#`` comment
    lines skipped; the final newline optional, as in the release's files). Every iterate needs both lines, each listed
    once, naming at least one file without repeats.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read seed file {path}: {exc}") from exc
    found: dict[tuple[str, int], tuple[list[str], int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(SEED_COMMENT):
            continue
        match = _SEED_LINE.match(line)
        if match is None:
            raise DatasetError(
                f"seed file {path} line {number} is malformed ({line.strip()[:60]!r}): "
                f"expected 'a-<i>: f1 f2 ...' or 'n-<i>: f1 f2 ...'"
            )
        kind, iterate, names = match.group(1), int(match.group(2)), match.group(3).split()
        if (kind, iterate) in found:
            raise DatasetError(f"seed file {path} line {number} repeats {kind}-{iterate}: keep one such line")
        if not names:
            raise DatasetError(f"seed file {path} line {number} ({kind}-{iterate}) names no file: list the support images")
        if len(set(names)) != len(names):
            raise DatasetError(f"seed file {path} line {number} ({kind}-{iterate}) names a file twice: list each image once")
        found[(kind, iterate)] = (names, number)
    out: dict[int, tuple[list[str], list[str]]] = {}
    for kind, iterate in sorted(found, key=lambda key: (key[1], key[0])):
        other = "n" if kind == "a" else "a"
        if (other, iterate) not in found:
            number = found[(kind, iterate)][1]
            raise DatasetError(
                f"seed file {path} line {number} has {kind}-{iterate} but no {other}-{iterate} line: add it"
            )
        out[iterate] = (found[("a", iterate)][0], found[("n", iterate)][0])
    return out


def read_seed_file(path: Path | str, iterate: int) -> tuple[list[str], list[str]]:
    """(abnormal names, normal names) from lines ``a-<iterate>:`` and ``n-<iterate>:`` of ``path``."""
    path = Path(path)
    entries = _parse_seed_file(path)
    if iterate not in entries:
        have = ", ".join(str(i) for i in entries) or "none"
        raise DatasetError(
            f"seed file {path} has no a-{iterate}/n-{iterate} lines (iterates present: {have}): "
            f"pass one of those to --iterate or add the lines"
        )
    abnormal, normal = entries[iterate]
    return list(abnormal), list(normal)


def write_seed_file(path: Path | str, support: "Support", iterate: int) -> None:
    """Write ``support`` as lines ``a-<iterate>: ...`` / ``n-<iterate>: ...`` (release format), atomically,
    after a ``#`` comment line saying where the support came from (``support.source``).

    Lines of other iterates already in ``path`` are kept (the release format holds several
    iterates per file); this iterate's lines are replaced. The file is written to a temporary file in
    the same folder and moved into place (:func:`mvfa.runtime.files.write_text_atomic`), so a crash never leaves half a file.
    ``iterate`` must be >= 0 (``a--1`` could not be read back).
    """
    path = Path(path)
    if iterate < 0:
        raise DatasetError(f"cannot write seed file {path} for iterate {iterate}: use an iterate >= 0 to record a support")
    entries = _parse_seed_file(path) if path.exists() else {}
    names = ([s.path.name for s in support.abnormal], [s.path.name for s in support.normal])
    for name in names[0] + names[1]:
        if not name or any(ch.isspace() for ch in name):
            raise DatasetError(f"cannot write seed file {path}: file name {name!r} contains whitespace; rename the image")
    entries[iterate] = names
    text = f"{SEED_COMMENT} iterate {iterate}: {support.source}\n"
    text += "".join(f"a-{i}: {' '.join(a)}\nn-{i}: {' '.join(n)}\n" for i, (a, n) in entries.items())
    write_text_atomic(path, text, encoding="utf-8")


@dataclass
class Support:
    """The few-shot support: ``shot`` abnormal and ``shot`` normal samples of the valid split.

    ``source`` says where they came from, e.g. ``"seed file dataset/fewshot_seed/Brain/4-shot.txt,
    lines a-0/n-0"`` or ``"random draw (seed 111, iterate 3; ...)"``.
    """

    abnormal: list[Sample]
    normal: list[Sample]
    source: str


def _pick_named(names: list[str], available: dict[str, Sample], folder: Path, seed_file: Path) -> list[Sample]:
    picked = []
    for name in names:
        if name not in available:
            raise DatasetError(f"seed file {seed_file} names {name}, which is not in {folder}: fix the file or the data")
        picked.append(available[name])
    return picked


def _draw(samples: list[Sample], shot: int, rng: np.random.Generator, folder: Path) -> list[Sample]:
    if shot > len(samples):
        raise DatasetError(
            f"{folder} holds {len(samples)} images, fewer than the {shot} requested: lower --shot to at most {len(samples)}"
        )
    order = rng.permutation(len(samples))
    return [samples[i] for i in order[:shot]]


def select_support(
    dataset: MedicalDataset, shot: int, iterate: int, seed: int, seed_dirs: Sequence[Path]
) -> Support:
    """The few-shot support from ``dataset``'s valid split.

    1. For ``iterate >= 0``, each ``<seed_dir>/<dataset.name>/<shot>-shot.txt`` is tried in
       ``seed_dirs`` order; the first file with lines ``a-<iterate>``/``n-<iterate>`` gives the
       support, in the order listed (names are file names in valid/Ungood/img and valid/good/img;
       the file must list exactly ``shot`` of each). A malformed file is an error, not skipped.
    2. Otherwise (no such file, no file with that iterate, or ``iterate == -1``) the support is a
       deterministic random draw: ``rng = numpy.random.default_rng([seed, iterate + 1])``;
       abnormal = first ``shot`` of ``rng.permutation(n_abnormal)`` over the name-sorted valid
       Ungood images, then normal = first ``shot`` of ``rng.permutation(n_normal)`` (same
       generator) over the name-sorted valid good images. The release's ``--iterate -1`` samples at
       random; here -1 is still reproducible from ``seed`` (it uses entropy ``[seed, 0]``). Draws
       for a larger ``shot`` extend those for a smaller one (same seed and iterate).
    """
    if shot < 1:
        raise DatasetError(f"--shot {shot} is invalid: the few-shot support needs at least 1 image per class")
    if iterate < -1:
        raise DatasetError(f"--iterate {iterate} is invalid: use -1 (random draw) or a seed-file line number >= 0")
    if seed < 0:
        raise DatasetError(f"--seed {seed} is invalid: use a non-negative integer")
    samples = dataset.samples("valid")
    abnormal = [s for s in samples if s.label == 1]
    normal = [s for s in samples if s.label == 0]
    abnormal_dir = dataset.root / "valid" / ABNORMAL_DIR / IMAGE_DIR
    normal_dir = dataset.root / "valid" / NORMAL_DIR / IMAGE_DIR

    note = ""
    if iterate >= 0:
        looked = []
        for seed_dir in seed_dirs:
            seed_file = Path(seed_dir) / dataset.name / f"{shot}-shot.txt"
            if not seed_file.is_file():
                continue
            looked.append(str(seed_file))
            entries = _parse_seed_file(seed_file)
            if iterate not in entries:
                continue
            abnormal_names, normal_names = entries[iterate]
            for kind, names in (("abnormal", abnormal_names), ("normal", normal_names)):
                if len(names) != shot:
                    raise DatasetError(
                        f"seed file {seed_file} lists {len(names)} {kind} images for iterate {iterate}, "
                        f"not {shot}: a {shot}-shot file must list {shot} of each"
                    )
            return Support(
                abnormal=_pick_named(abnormal_names, {s.path.name: s for s in abnormal}, abnormal_dir, seed_file),
                normal=_pick_named(normal_names, {s.path.name: s for s in normal}, normal_dir, seed_file),
                source=f"seed file {seed_file}, lines a-{iterate}/n-{iterate}",
            )
        if looked:
            note = f"; {', '.join(looked)} has no line for iterate {iterate}"
        else:
            where = f"in {', '.join(str(d) for d in seed_dirs)}" if seed_dirs else "(no seed folders given)"
            note = f"; no {dataset.name}/{shot}-shot.txt {where}"

    rng = np.random.default_rng([seed, iterate + 1])
    drawn_abnormal = _draw(abnormal, shot, rng, abnormal_dir)
    drawn_normal = _draw(normal, shot, rng, normal_dir)
    return Support(
        abnormal=drawn_abnormal,
        normal=drawn_normal,
        source=f"random draw (seed {seed}, iterate {iterate}{note})",
    )
