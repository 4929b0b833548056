"""python -m dataset.prepare: your own images -> the release's folder layout, split into valid and test.

    python -m dataset.prepare --normal DIR --abnormal DIR [--masks DIR] --out data/Knee_AD
                              [--valid_fraction 0.3] [--seed 0] [--link] [--mask_suffix _mask]
                              [--binarize_masks [T]]

Takes a flat folder of normal images and one of abnormal images (and optionally a folder of pixel
masks for the abnormal ones) and writes ``<out>/{valid,test}/{good,Ungood}/img`` (plus
``Ungood/anomaly_mask`` with masks), which :func:`dataset.medical.open_dataset` reads.

Decisions:

* The split is deterministic and per class: files are ordered by sha256 of ``"<seed>:<class>:<file
  name>"`` and the first ``round(valid_fraction * n)`` go to valid (at least one to each split
  when a class has two or more images). It depends only on the file names and the seed, not on the
  listing order, and adding images moves few of the others.
* Only files directly in each folder are used; files whose suffix is not an image suffix and
  sub-folders are reported and skipped; hidden files are ignored. Every image's header is read
  (an unreadable image stops the run, naming it).
* Masks are matched to abnormal images by file name, else by stem (``0001.jpg`` -> ``0001.png``;
  ``--mask_suffix _mask`` also matches ``0001_mask.png``); every abnormal image needs one of its
  image's size. Masks are written as ``anomaly_mask/<image stem><mask suffix>``.
* Every mask is decoded and checked as the data layer will read it (:func:`dataset.medical.mask_array`:
  single-channel, or RGB with equal channels, holding only 0 and 255). A mask that is not stops the
  run with one line naming it and its values, unless ``--binarize_masks [T]`` is given: masks that
  fail the check are then converted, values above T (default 0; in the file's own units, any
  channel of a colour mask) becoming 255 and the rest 0, and written as ``<image stem>.png``
  (counted in the report, flagged in ``split.csv``). Nothing is converted without the flag.
* An abnormal image whose mask is empty (no 255 pixel) is a warning in the report, not an error: it
  keeps its image-level label and adds no anomalous pixel. All masks empty is an error (the pixel
  metrics would be undefined): drop ``--masks`` for image-level labels only.
* Files are copied (``--link``: hard-linked; converted masks are written). The output must not exist
  or be an empty folder, and its folder must be writable (a folder without write bits counts as
  read-only, even for root): both are checked before anything is read. It is written to a temporary
  folder beside it and renamed into place when complete; a failure removes the temporary folder
  and any parent folder this run created. ``split.csv`` in it records where every file came from.
* The report ends with a ``next:`` command that runs on the prepared data as printed: few-shot
  training with the largest ``--shot`` up to 4 that leaves images of both classes in valid for
  ``--select valid`` (which selects on the valid images that are not support images), else
  ``--select last``; or, when no few-shot run is possible, what is missing.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
import hashlib
import math
import os
from pathlib import Path
import shlex
import shutil
import sys
import tempfile

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("prepare")

from PIL import Image
import numpy as np

from dataset.errors import DatasetError
from dataset.medical import (
    ABNORMAL_DIR,
    DATASET_SUFFIX,
    IMAGE_DIR,
    IMAGE_SUFFIXES,
    MASK_FOLDERS,
    MASK_ON,
    NORMAL_DIR,
    SPLITS,
    mask_array,
    open_checked,
)
from mvfa.parsers import prepare_parser as build_parser
from mvfa.runtime.files import missing_folders, nearest_existing, writable_folder

CLASSES = (("normal", NORMAL_DIR), ("abnormal", ABNORMAL_DIR))
MASK_DIR = MASK_FOLDERS[0]
BINARIZED_SUFFIX = ".png"  # converted masks are written losslessly
DEFAULT_SHOT = 4  # the paper's k: the next command's --shot when the valid split allows it
SEED_LISTS = Path(__file__).resolve().parent / "fewshot_seed"
"""The scripts' default --fewshot_seed_dir: lists of the benchmark's file names, which a prepared dataset of the
same name does not hold, so the next command draws its support (--iterate -1) instead when a list exists."""


@dataclass
class Item:
    source: Path
    label: str  # "normal" or "abnormal"
    split: str = ""
    mask: Path | None = None
    matched_by: str = ""  # "name" or "stem"
    mask_binarized: bool = False  # the mask failed the 0/255 check and is written converted
    mask_empty: bool = False  # the (converted) mask has no anomalous pixel


@dataclass
class Report:
    """What prepare found and wrote."""

    out: Path
    items: list[Item]
    has_masks: bool
    skipped: list[str] = field(default_factory=list)
    unused_masks: int = 0
    linked: bool = False
    binarize: int | None = None  # --binarize_masks threshold, None without the flag
    seed_lists: Path = SEED_LISTS  # the shipped support lists: a dataset named like one of them draws its own

    def count(self, split: str, label: str) -> int:
        return sum(1 for i in self.items if i.split == split and i.label == label)

    def masks(self, split: str) -> int:
        return sum(1 for i in self.items if i.split == split and i.mask is not None)

    def warnings(self) -> list[str]:
        out = []
        for split in SPLITS:
            for label, _ in CLASSES:
                if self.count(split, label) == 0:
                    use = "the test scripts need both classes" if split == "test" else "few-shot training needs k of each class"
                    out.append(f"warning: {split} holds no {label} image ({use})")
        empty = [i.source.name for i in self.items if i.mask_empty]
        if empty:
            out.append(
                f"warning: {len(empty)} abnormal images have an empty mask (first: {empty[0]}): they count as "
                "abnormal for the image metrics but add no anomalous pixel"
            )
        return out

    def next_command(self) -> str:
        """A command that runs on the prepared data as printed, or why none does yet (one line).

        --select valid selects on the valid images that are not support images, so it needs more
        than --shot valid images of each class; with fewer, --select last (no selection) still runs.
        """
        name = self.out.name[: -len(DATASET_SUFFIX)]
        missing = [f"{split} holds no {label} image" for split in SPLITS for label, _ in CLASSES
                   if self.count(split, label) == 0]
        if missing:
            return (f"next: no few-shot run is possible yet ({'; '.join(missing)}): add images or change "
                    "--valid_fraction")
        valid_min = min(self.count("valid", label) for label, _ in CLASSES)
        if valid_min > 1:
            shot, select = min(DEFAULT_SHOT, valid_min - 1), "valid"
        else:
            shot, select = min(DEFAULT_SHOT, valid_min), "last"
        word = name.replace("_", " ").lower()
        command = ["python", "train_few.py", "--obj", name, "--data_path", str(self.out.parent),
                   "--prompt_name", word, "--shot", str(shot), "--select", select]
        if (self.seed_lists / name).exists():
            command += ["--iterate", "-1"]
        return "next: " + " ".join(shlex.quote(part) for part in command)

    def shot_note(self) -> str | None:
        valid_min = min(self.count("valid", label) for label, _ in CLASSES)
        if not valid_min:
            return None
        note = f"note: valid's smaller class has {valid_min} images: --shot at most {valid_min}"
        if valid_min > 1:
            return note + f", and at most {valid_min - 1} with --select valid (it selects on the valid images left beside the support)"
        return note + " and --select last or test (--select valid needs valid images left beside the support)"

    def table(self) -> str:
        rows = [("split", "normal", "abnormal", "masks")]
        for split in SPLITS:
            masks = str(self.masks(split)) if self.has_masks else "-"
            rows.append((split, str(self.count(split, "normal")), str(self.count(split, "abnormal")), masks))
        total_masks = str(sum(self.masks(s) for s in SPLITS)) if self.has_masks else "-"
        rows.append(("total", str(sum(self.count(s, "normal") for s in SPLITS)),
                     str(sum(self.count(s, "abnormal") for s in SPLITS)), total_masks))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )

    def text(self) -> str:
        name = self.out.name[: -len(DATASET_SUFFIX)]
        abnormal = [i for i in self.items if i.label == "abnormal"]
        if self.has_masks:
            by_name = sum(1 for i in abnormal if i.matched_by == "name")
            masks = f"yes, all {len(abnormal)} abnormal images ({by_name} by file name, {len(abnormal) - by_name} by stem)"
            if self.unused_masks:
                masks += f"; {self.unused_masks} mask files matched no abnormal image"
            converted = sum(1 for i in abnormal if i.mask_binarized)
            if self.binarize is not None:
                masks += f"; {converted} converted to 0/{MASK_ON} (values > {self.binarize} -> {MASK_ON}, written as PNG)"
        else:
            masks = "no (image-level labels only: no pixel metrics, seg adapters not trained)"
        lines = [f"dataset {name}: masks {masks}", self.table()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: " + "; ".join(self.skipped))
        lines += self.warnings()
        note = self.shot_note()
        if note:
            lines.append(note)
        lines.append(f"-> {self.out.resolve()} ({'hard-linked' if self.linked else 'copied'}; split.csv lists every file)")
        lines.append(self.next_command())
        if lines[-1].startswith("next: python"):
            lines.append("(--prompt_name: the object word of the prompts; name what the images show, e.g. \"knee MRI\")")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Finding files


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_folder(folder: Path, what: str, skipped: list[str]) -> list[Path]:
    """Image files directly in `folder`, sorted by name; others are added to `skipped`."""
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} is not a folder")
    images = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            skipped.append(f"{path} (a folder, not searched)")
        elif _is_image(path):
            images.append(path)
        else:
            skipped.append(f"{path} (not an image)")
    return images


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {str(err) or type(err).__name__}; fix or remove it") from None


def split_order(names: list[str], seed: int, label: str) -> list[str]:
    """`names` in the split's order: by sha256 of '<seed>:<label>:<name>' (independent of listing order)."""
    return sorted(names, key=lambda name: (hashlib.sha256(f"{seed}:{label}:{name}".encode()).hexdigest(), name))


def valid_count(n: int, fraction: float) -> int:
    """round(fraction * n), half up; at least one image in each split when n >= 2."""
    count = int(math.floor(fraction * n + 0.5))
    if n >= 2:
        count = min(max(count, 1), n - 1)
    return count


def assign_splits(items: list[Item], fraction: float, seed: int) -> None:
    for label, _ in CLASSES:
        of_class = {i.source.name: i for i in items if i.label == label}
        order = split_order(list(of_class), seed, label)
        cut = valid_count(len(order), fraction)
        for rank, name in enumerate(order):
            of_class[name].split = "valid" if rank < cut else "test"


def match_masks(abnormal: list[Item], masks_dir: Path, mask_suffix: str, skipped: list[str]) -> int:
    """Set each abnormal item's mask (by name, else stem); returns the number of unused mask files."""
    masks = list_folder(masks_dir, "--masks", skipped)
    by_name = {p.name: p for p in masks}
    by_stem: dict[str, list[Path]] = {}
    for path in masks:
        stem = path.stem[: -len(mask_suffix)] if mask_suffix and path.stem.endswith(mask_suffix) else path.stem
        by_stem.setdefault(stem, []).append(path)
    missing = []
    for item in abnormal:
        if item.source.name in by_name:
            item.mask, item.matched_by = by_name[item.source.name], "name"
            continue
        candidates = by_stem.get(item.source.stem, [])
        if len(candidates) > 1:
            raise DatasetError(
                f"several masks in {masks_dir} match {item.source.name} by stem "
                f"({', '.join(p.name for p in candidates)}): keep one"
            )
        if candidates:
            item.mask, item.matched_by = candidates[0], "stem"
        else:
            missing.append(item.source.name)
    if missing:
        raise DatasetError(
            f"{len(missing)} abnormal images have no mask in {masks_dir} (first: {missing[0]}): masks are matched by "
            f"file name or stem{' after removing ' + repr(mask_suffix) if mask_suffix else ' (--mask_suffix strips e.g. _mask)'}"
        )
    stems = {}
    for item in abnormal:
        if item.source.stem in stems:
            raise DatasetError(
                f"abnormal images {stems[item.source.stem]} and {item.source.name} share a stem, so their masks "
                "would share a name: rename one"
            )
        stems[item.source.stem] = item.source.name
    used = {item.mask for item in abnormal}
    return sum(1 for path in masks if path not in used)


# ------------------------------------------------------------------------------------------------
# Mask values


def binarize_mask(image: Image.Image, threshold: int, path: Path) -> np.ndarray:
    """0/255 uint8 [H, W]: 255 where a value exceeds `threshold` (the file's own units; any channel of
    a colour mask, alpha ignored), else 0. Only for --binarize_masks: the data layer never converts."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image)
    elif image.mode in ("1", "L"):
        values = np.asarray(image.convert("L"))
    elif image.mode == "LA":
        values = np.asarray(image.getchannel("L"))
    else:
        values = np.asarray(image.convert("RGB")).max(axis=-1)
    return np.where(values > threshold, MASK_ON, 0).astype(np.uint8)


def check_masks(abnormal: list[Item], binarize: int | None) -> None:
    """Decode every mask and check it as the data layer will read it; with `binarize`, mark those to convert.

    Without --binarize_masks a mask that is not 0/255 is an error naming it (and how many others
    fail too). Sets each item's `mask_binarized` and `mask_empty`; all masks empty is an error.
    """
    bad: list[str] = []
    advice = f"pass --binarize_masks to convert such masks (values > 0 -> {MASK_ON}; --binarize_masks T: values > T)"
    for item in abnormal:
        image = open_checked(item.mask)
        try:
            pixels = mask_array(image, item.mask, advice)
        except DatasetError as err:
            if binarize is None:
                bad.append(str(err))
                continue
            pixels, item.mask_binarized = binarize_mask(image, binarize, item.mask), True
        item.mask_empty = not pixels.any()
    if bad:
        more = f" ({len(bad) - 1} more masks are not 0/{MASK_ON} either)" if len(bad) > 1 else ""
        raise DatasetError(bad[0] + more)
    if abnormal and all(item.mask_empty for item in abnormal):
        raise DatasetError(
            f"every mask of the {len(abnormal)} abnormal images is empty (no pixel marked "
            f"{'after --binarize_masks ' + str(binarize) if binarize is not None else MASK_ON}), e.g. {abnormal[0].mask}: "
            "pixel metrics would be undefined; fix the masks or drop --masks (image-level labels only)"
        )


# ------------------------------------------------------------------------------------------------
# Writing


def _place(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
        except OSError as err:
            raise DatasetError(
                f"cannot hard-link {source} to {target} ({err.strerror or err}): another file system? drop --link to copy"
            ) from None
    else:
        shutil.copy2(source, target)


def _write(root: Path, items: list[Item], has_masks: bool, link: bool, binarize: int | None) -> None:
    for split in SPLITS:
        for _, folder in CLASSES:
            (root / split / folder / IMAGE_DIR).mkdir(parents=True)
        if has_masks:
            (root / split / ABNORMAL_DIR / MASK_DIR).mkdir()
    rows = [["split", "class", "file", "source", "mask", "mask_source", "mask_binarized"]]
    for item in sorted(items, key=lambda i: (i.split, i.label, i.source.name)):
        folder = dict(CLASSES)[item.label]
        target = root / item.split / folder / IMAGE_DIR / item.source.name
        _place(item.source, target, link)
        mask_name = ""
        if item.mask is not None:
            mask_dir = root / item.split / ABNORMAL_DIR / MASK_DIR
            if item.mask_binarized:
                mask_name = item.source.stem + BINARIZED_SUFFIX
                pixels = binarize_mask(open_checked(item.mask), binarize, item.mask)
                Image.fromarray(pixels, mode="L").save(mask_dir / mask_name, format="PNG")
            else:
                mask_name = item.source.stem + item.mask.suffix
                _place(item.mask, mask_dir / mask_name, link)
        rows.append([item.split, item.label, item.source.name, str(item.source), mask_name, str(item.mask or ""),
                     int(item.mask_binarized) if item.mask is not None else ""])
    with open(root / "split.csv", "w", newline="") as stream:
        csv.writer(stream, lineterminator="\n").writerows(rows)


def check_output(out: Path) -> None:
    """Refuse, before anything is read, an --out that cannot become the new dataset folder (one line each)."""
    if not out.name.endswith(DATASET_SUFFIX) or len(out.name) <= len(DATASET_SUFFIX):
        raise DatasetError(f"--out {out} must be a folder named <Name>{DATASET_SUFFIX} (e.g. data/Knee{DATASET_SUFFIX})")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DatasetError(f"--out {out} is a file, not a folder: choose a new folder path (nothing is overwritten)")
        if any(out.iterdir()):
            raise DatasetError(f"--out {out} exists and is not empty: choose a new folder (nothing is overwritten)")
        if not writable_folder(out):
            raise DatasetError(f"--out {out} is read-only: make it writable or choose another folder")
    ancestor = nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise DatasetError(f"--out {out} cannot be created: {ancestor} is a file, not a folder")
    if not writable_folder(ancestor):
        raise DatasetError(f"--out {out} cannot be created: {ancestor} is read-only (no write permission)")


def prepare(
    normal: Path, abnormal: Path, out: Path, masks: Path | None = None, valid_fraction: float = 0.3, seed: int = 0,
    link: bool = False, mask_suffix: str = "", binarize: int | None = None,
) -> Report:
    """Build the dataset folder `out` (named <Name>_AD); returns the report. Bad input raises DatasetError.

    `binarize` (--binarize_masks): convert masks that are not 0/255, values > binarize becoming 255.
    On any failure nothing is left: no `out`, no temporary folder, no parent folder created here.
    """
    normal, abnormal, out = Path(normal), Path(abnormal), Path(out)
    check_output(out)
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"--valid_fraction {valid_fraction} is invalid: use a share between 0 and 1 (e.g. 0.3)")
    if seed < 0:
        raise DatasetError(f"--seed {seed} is invalid: use a non-negative integer")
    if binarize is not None and (masks is None or binarize < 0):
        raise DatasetError(f"--binarize_masks {binarize} is invalid: it converts --masks, with a threshold >= 0 (default 0)")
    if normal.is_dir() and abnormal.is_dir() and normal.resolve() == abnormal.resolve():
        raise DatasetError(f"--normal and --abnormal are the same folder ({normal}): put each class in its own folder")

    skipped: list[str] = []
    items = [Item(p, "normal") for p in list_folder(normal, "--normal", skipped)]
    items += [Item(p, "abnormal") for p in list_folder(abnormal, "--abnormal", skipped)]
    if not items:
        raise DatasetError(f"{normal} and {abnormal} hold no image ({'/'.join(IMAGE_SUFFIXES)} files)")
    sizes = {item.source: _image_size(item.source) for item in items}
    unused = 0
    if masks is not None:
        abnormal_items = [i for i in items if i.label == "abnormal"]
        unused = match_masks(abnormal_items, Path(masks), mask_suffix, skipped)
        for item in abnormal_items:
            size = _image_size(item.mask)
            if size != sizes[item.source]:
                raise DatasetError(
                    f"mask {item.mask} is {size[0]}x{size[1]} but its image {item.source} is "
                    f"{sizes[item.source][0]}x{sizes[item.source][1]}: a mask must have its image's size"
                )
        check_masks(abnormal_items, binarize)
    assign_splits(items, valid_fraction, seed)

    created = missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            _write(tmp, items, masks is not None, link, binarize)
            tmp.chmod(0o777 & ~_umask())
            os.replace(tmp, out)  # onto an empty folder too (rename(2) replaces an empty directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as err:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            raise DatasetError(f"cannot write {out}: {err.strerror or err}{where}; nothing was written") from None
        raise
    return Report(out, items, masks is not None, skipped, unused, link, binarize)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = prepare(
            Path(args.normal), Path(args.abnormal), Path(args.out), Path(args.masks) if args.masks else None,
            args.valid_fraction, args.seed, args.link, args.mask_suffix, args.binarize_masks,
        )
    except DatasetError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
