"""python -m mvfa.predict: score new images with trained adapters; overlays, a CSV, a decision per image.

    python -m mvfa.predict --ckpt ADAPTERS --input IMAGE_OR_FOLDER [--support FOLDER_OF_NORMAL_IMAGES]
                           --output_dir DIR [--masks FOLDER] [--threshold T]

With --support (a folder of normal images, augmented 11 times into the memory bank as in training)
each image is scored by the few-shot fusion; without it by the zero-shot branch alone. Building the
bank is most of a small run's time on a CPU (11 forwards per support image): --save_bank PATH writes
it, and later runs with the same checkpoint, CLIP weights and settings pass --bank PATH instead of
--support (checked against a fingerprint of the weights; the same scores). Scores use the
fixed normalisation statistics stored in the checkpoint at training (fitted on valid normal images),
so an image's score depends only on that image and the support: it equals test_few's score under
`--normalize checkpoint`. The decision is `abnormal` when score >= the threshold stored with them
(or --threshold).

The checkpoint's metadata gives the model name, input size, adapter stages, object word and
whether the training data had masks; the release's checkpoints have none, so the flags
--model_name, --img_size, --features_list, --prompt_name and --has_masks must say it (one error
line names those missing). Without statistics the raw branch values are used (a note says so).

The CLIP weights are --clip_ckpt when given, else the file the checkpoint's metadata records
(`clip_ckpt`, when that file exists here), else OpenAI's file of the model in CLIP/ckpt/; a model
without one (a tiny test model) and no recorded file is one error line that says which --clip_ckpt
to pass. --model_name, --img_size or --features_list that contradict the metadata are an error.

Outputs in --output_dir: predictions.csv (path, score, decision, map_max, overlay), one
`<stem>_<suffix>_overlay.png` per image (`a.png` -> `a_png_overlay.png`; names that differ only in
case get `_2`, `_3`; a figure: the image, the map as a heatmap whose opacity grows with its value, a
colour bar, the score and decision; the mask's contour with --masks) and predict.json (the settings
used, the CLIP weights among them). They are written whole or not at all (see `OutputFolder`):
--output_dir must be new, empty, or hold an earlier run's outputs, which --overwrite replaces.
Files in the input folder that are not images are reported ("skipped notes.txt: not an image") and
skipped, and so are special files (FIFOs, devices) named like images; hidden files and sub-folders
are ignored. An unreadable image is reported on one line and skipped; the exit code is then 1 (0
when every image was scored, 2 for bad flags, checkpoints, support images or output folders, 130
when interrupted).
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
import csv
from dataclasses import dataclass
import io
import json
import os
from pathlib import Path
import re
import shutil
import sys
import tempfile

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("predict")

from PIL import Image
import torch

from dataset.errors import DatasetError
from dataset.medical import IMAGE_SUFFIXES, MaskIndex, Sample, folder_entries, is_image_name, load_image, load_mask
from dataset.tensors import PIXEL_LEVELS, TensorSet

from mvfa.adapter_settings import SETTING_NAMES, ClipWeights, ModelSettings, read_adapters, resolve_clip_weights, resolve_settings
from mvfa.calibration.normalization import Normalization
from mvfa.method.augment import augment
from mvfa.method.backbone import build_adapted_model
from mvfa.method.evaluation import evaluate
from mvfa.method.memory_bank import MemoryBank, bank_branch, build_memory_bank, check_bank_file, read_memory_bank, save_memory_bank
from mvfa.method.model import AdaptedViT
from mvfa.method.scorer import FewShotScorer, ScoringMode, ZeroShotScorer
from mvfa.parsers import add_model_flags  # noqa: F401 - mvfa.predict.add_model_flags is public
from mvfa.parsers import predict_parser as build_parser
from mvfa.runs.calibrate import stored_normalization, stored_threshold
from mvfa.runs.visualize import overlay, save_png
from mvfa.runtime.errors import MVFAError, single_line
from mvfa.runtime.files import (
    check_writable_file,
    default_folder_mode,
    file_kind,
    nearest_existing,
    os_error_text,
    remove_stale_temporaries,
    temporary_target,
    write_text_atomic,
)
from mvfa.runtime.process import INTERRUPTED, USER_ERRORS, resolve_cache_dir, resolve_device, resolve_precision

CHUNK = 32  # images decoded and scored at a time
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "predict.json"
OVERLAY_NAME = re.compile(r"^.+_overlay(_\d+)?\.png$")  # what _overlay_names gives
SHOWN_NAMES = 3  # names listed in an error about a folder's content


def build(args: argparse.Namespace, settings: ModelSettings, state: dict, source: str, clip: ClipWeights):
    """The adapted model with the checkpoint's adapters, its text bank and the device, precision."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, text_bank = build_adapted_model(
        settings.model_name, settings.img_size, settings.features_list, clip.path,
        "openai", settings.quick_gelu, device, resolve_cache_dir(args.cache_dir), visual_fp32_later=True,
    )
    model.load_adapter_state(state, source=source)
    model.eval()
    return model, text_bank, device, precision


def check_bank_shape(bank: MemoryBank, branch: str, model: AdaptedViT, path: str) -> None:
    """A bank whose identity matches but whose tensors do not fit the model (another width or stage
    count: a file from another version, or edited) is one error line, not a failure inside scoring."""
    stages = bank.stages(branch)
    width = model.embed_dim
    rebuild = f"rebuild it with --support FOLDER --save_bank {path}"
    if len(stages) != len(model.stages):
        raise MVFAError(f"--bank {path} holds {len(stages)} stages of tokens, the model has {len(model.stages)} "
                        f"adapter stages: {rebuild}")
    for index, tokens in enumerate(stages, 1):
        if tokens.ndim != 2 or int(tokens.shape[-1]) != width:
            raise MVFAError(f"--bank {path} holds stage-{index} tokens of shape {list(tokens.shape)}, expected "
                            f"[rows, {width}] (the model's token width): {rebuild}")


# ------------------------------------------------------------------------------------------------
# Inputs


def list_images(folder: Path, report) -> list[Path]:
    """Image files directly in `folder`, by name (dataset.medical.folder_entries); other files reported
    through `report` and skipped."""
    images, others = folder_entries(folder)
    for path in others:
        if not path.is_file():
            report(f"skipped {path.name}: {file_kind(path)}, not a regular file")
        else:
            report(f"skipped {path.name}: not an image (image files end in {'/'.join(IMAGE_SUFFIXES)})")
    return images


def input_images(path: Path, report) -> list[Path]:
    if path.is_dir():
        images = list_images(path, report)
        if not images:
            raise MVFAError(f"{path} holds no image ({'/'.join(IMAGE_SUFFIXES)} files)")
        return images
    if not path.exists():
        raise MVFAError(f"--input {path} does not exist: pass an image or a folder of images")
    if not path.is_file():
        raise MVFAError(f"--input {path} is {file_kind(path)}, not a regular file: pass an image or a folder of images")
    if not is_image_name(path):
        raise MVFAError(f"--input {path} is not an image (image files end in {'/'.join(IMAGE_SUFFIXES)})")
    return [path]


class MaskFinder:
    """Masks of --masks by the image's file name, else by its stem (one mask of that stem): dataset.medical.MaskIndex."""

    def __init__(self, folder: Path | None) -> None:
        if folder is not None and not folder.is_dir():
            raise MVFAError(f"--masks {folder} is not a folder")
        self.index = MaskIndex(folder) if folder is not None else None

    def find(self, image: Path) -> Path | None:
        """The mask of `image`; None when there is none, or several of its stem and none of its name."""
        return self.index.lookup(image) if self.index is not None else None


def load_support(folder: Path, img_size: int, report) -> torch.Tensor:
    """The support folder's normal images, augmented 11 times as training's memory bank ([11 k, 3, S, S])."""
    if not folder.is_dir():
        raise MVFAError(f"--support {folder} is not a folder of normal images")
    paths = list_images(folder, report)
    if not paths:
        raise MVFAError(f"--support {folder} holds no image ({'/'.join(IMAGE_SUFFIXES)} files)")
    support = TensorSet.load([Sample(path=p, label=0) for p in paths], img_size, desc="support")
    images, _ = augment(support.float_images())  # as mvfa.runs.support.prepare_few_shot
    return images


# ------------------------------------------------------------------------------------------------
# Outputs


def _listed(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


class OutputFolder:
    """predict's outputs, written whole or not at all.

    A run writes many files (an overlay per image, predictions.csv, predict.json) over minutes;
    written one by one into --output_dir, an interruption would leave overlays without a CSV, or
    a new CSV beside the overlays of an earlier run. So every file goes into a staging folder
    beside --output_dir (`.<name>.<random>.tmp`, same file system), which replaces --output_dir by
    renames when the run is complete: an interruption (Ctrl-C, an error) removes the staging folder
    and leaves --output_dir as it was, the earlier complete results or nothing. A killed run leaves
    its staging folder; the next run with the same --output_dir removes it, and the `.<file>.<random>.tmp`
    files of interrupted atomic writes inside --output_dir (mvfa.runtime.files).

    As the folder is replaced whole, --output_dir must be new, empty, or hold only an earlier run's
    outputs (predictions.csv, predict.json, *_overlay.png), which need --overwrite: files predict
    did not write are never deleted. One run at a time per --output_dir (the cleaning above would
    remove a concurrent run's staging folder). Checks happen at construction (no writes) and in
    `staged` (the staging folder is made before any model is built, which proves the place writable).
    """

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path = path
        # absolute ("." and ".." get a name and a parent); a link to a folder: the folder is replaced
        self.target = path.resolve() if path.is_symlink() else Path(os.path.abspath(path))
        if self.target.exists() and not self.target.is_dir():
            raise MVFAError(f"--output_dir {path} is {file_kind(self.target)}, not a folder: pass a folder path "
                            "(it is created when missing)")
        existing = nearest_existing(Path(os.path.abspath(self.target.parent)))
        if not existing.is_dir():
            raise MVFAError(f"--output_dir {path} cannot be made: {existing} is a file, not a folder; choose another path")
        if self.target.is_dir():
            self._check_content(overwrite)

    def _check_content(self, overwrite: bool) -> None:
        try:
            names = [e.name for e in self.target.iterdir() if temporary_target(e.name) is None]
        except OSError as err:
            raise MVFAError(f"--output_dir {self.path} cannot be read ({err.strerror or err}): choose another folder") from None
        ours = [n for n in names if n in (PREDICTIONS_FILE, SUMMARY_FILE) or OVERLAY_NAME.match(n)]
        others = [n for n in names if n not in ours]
        if others:
            raise MVFAError(
                f"--output_dir {self.path} holds files predict did not write ({_listed(others)}): predict replaces the "
                "folder whole when it finishes, so choose a new or empty folder"
            )
        if ours and not overwrite:
            what = PREDICTIONS_FILE if PREDICTIONS_FILE in ours else _listed(ours)
            raise MVFAError(f"--output_dir {self.path} already holds an earlier run's results ({what}): pass --overwrite "
                            "to replace them, or choose another folder")
        if not os.access(self.target, os.W_OK | os.X_OK):  # the folder itself moves aside when it is replaced
            raise MVFAError(f"--output_dir {self.path} is read-only: choose a folder you can write to")

    def contains(self, path: Path) -> bool:
        """Whether `path` lies in the output folder (it would go when the folder is replaced)."""
        return self.target.resolve() in Path(path).resolve().parents

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield the staging folder; on success it becomes --output_dir, on any exception it is removed."""
        parent = self.target.parent
        remove_stale_temporaries(parent, self.target.name)
        if self.target.is_dir():
            remove_stale_temporaries(self.target)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=parent))
        except OSError as err:
            raise MVFAError(f"--output_dir {self.path} cannot be written ({err.strerror or err} in {parent}): predict "
                            "writes its results beside it first; choose a folder you can write to") from None
        try:
            yield staging
            os.chmod(staging, default_folder_mode())  # mkdtemp's 0700 -> what a plain mkdir gives
            self._replace_with(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _replace_with(self, staging: Path) -> None:
        if not self.target.exists():
            os.rename(staging, self.target)
            return
        # The earlier folder moves into a holder first (a rename cannot replace a non-empty folder);
        # an interruption between the two renames leaves no --output_dir, never a mixed one.
        holder = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))
        earlier = holder / self.target.name
        os.rename(self.target, earlier)
        try:
            os.rename(staging, self.target)
        except BaseException:
            os.rename(earlier, self.target)  # the earlier results go back
            raise
        shutil.rmtree(holder, ignore_errors=True)


def _overlay_names(paths: list[Path]) -> list[str]:
    """One overlay name per input, never shared: `<stem>_<suffix>_overlay.png` (a.png -> a_png_overlay.png,
    a_png.png -> a_png_png_overlay.png: suffixes hold no '_', so different names stay different);
    names equal but for case (A.png, a.png) get _2, _3, ... in input order, for case-insensitive file systems."""
    names, used = [], set()
    for path in paths:
        base = f"{path.stem}_{path.suffix.lstrip('.')}"
        name, count = f"{base}_overlay.png", 1
        while name.casefold() in used:
            count += 1
            name = f"{base}_overlay_{count}.png"
        used.add(name.casefold())
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------
# The command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except USER_ERRORS as err:
        print(f"error: {single_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted: no partial results were written to --output_dir {args.output_dir}", file=sys.stderr)
        return INTERRUPTED
    except OSError as err:  # a write that failed midway (disk full, a folder removed under the run)
        print(f"error: {os_error_text(err)}: no partial results were written to --output_dir {args.output_dir}; "
              "free space or fix the folder and run again", file=sys.stderr)
        return 1


@dataclass
class _Scoring:
    """How this run's scores are read: normalisation, threshold, and what the figures say about them."""

    normalization: Normalization
    calibrated: bool
    threshold: float | None
    threshold_source: str | None
    notes: list[str]


def _scoring(args: argparse.Namespace, meta: dict, ckpt: Path, settings: ModelSettings, few_shot: bool) -> _Scoring:
    """Statistics and threshold: the checkpoint's when they fit this scoring mode."""
    scoring = ScoringMode("few-shot" if few_shot else "zero-shot", settings.has_masks)
    mode = scoring.mode
    normalization, notes = None, []
    stored = stored_normalization(meta, str(ckpt))
    if stored is not None and not stored.missing(scoring.normalization_branches):
        normalization = stored
    calibrated = normalization is not None
    if not calibrated:
        normalization = Normalization.identity()
        notes.append(f"note: {ckpt} holds no normalisation statistics for {mode} scoring: raw branch values are used "
                     "(not on the 0..1 scale of normal valid images)")
    threshold, threshold_source = args.threshold, "--threshold"
    if threshold is None:
        threshold_source = None
        stored_value = meta.get("threshold")
        applies = stored_threshold(meta, str(ckpt), scoring)
        if applies is not None:
            threshold, threshold_source = applies[0], f"checkpoint ({meta.get('threshold_rule')} on valid)"
        elif stored_value is not None and meta.get("mode") != mode:
            notes.append(f"note: the checkpoint's threshold is for {meta.get('mode')} scoring "
                         f"({'with' if meta.get('mode') == 'few-shot' else 'without'} --support): decisions left empty; pass --threshold")
        else:
            notes.append("note: no threshold for these scores: decisions left empty; pass --threshold")
    return _Scoring(normalization, calibrated, threshold, threshold_source, notes)


def predict(args: argparse.Namespace) -> int:
    """The command's work; every check that needs no model runs before the model is built."""
    def report(line: str) -> None:
        print(line, file=sys.stderr)

    if args.batch_size < 1:
        raise MVFAError(f"--batch_size {args.batch_size} is invalid: use 1 or more")
    if args.bank is not None and args.support is not None:
        raise MVFAError("--bank and --support both given: a saved bank replaces the support folder; pass one")
    if args.save_bank is not None and args.support is None:
        raise MVFAError("--save_bank needs --support FOLDER (the normal images the bank is built from)")
    output = OutputFolder(Path(args.output_dir), args.overwrite)
    if args.save_bank is not None:
        check_writable_file(Path(args.save_bank), "--save_bank")
        if output.contains(Path(args.save_bank)):
            raise MVFAError(f"--save_bank {args.save_bank} is inside --output_dir {args.output_dir}, which predict "
                            "replaces whole: write the bank elsewhere")
    ckpt = Path(args.ckpt)
    state, meta = read_adapters(ckpt)
    settings = resolve_settings(args, meta, str(ckpt), SETTING_NAMES)
    clip, clip_notes = resolve_clip_weights(args.clip_ckpt, meta, settings.model_name, str(ckpt))
    if args.bank is not None:
        check_bank_file(args.bank)
    images = input_images(Path(args.input), report)
    masks = MaskFinder(Path(args.masks) if args.masks else None)
    few_shot = args.support is not None or args.bank is not None
    mode = "few-shot" if few_shot else "zero-shot"
    scoring = _scoring(args, meta, ckpt, settings, few_shot)
    support_images = load_support(Path(args.support), settings.img_size, report) if args.support is not None else None

    with output.staged() as staging:
        model, text_bank, device, precision = build(args, settings, state, str(ckpt), clip)
        text_features = text_bank(settings.object_word)
        text_bank.drop_text_tower()  # no other text is encoded: free the text weights
        model.float_with_block_workspace()  # the frozen blocks stay in the checkpoint's dtype, computed in fp32
        bank = None
        if few_shot:
            branch = bank_branch(settings.has_masks)
            identity = {"weights_sha256": model.fingerprint(), "model_name": settings.model_name, "img_size": settings.img_size,
                        "features_list": list(settings.features_list), "branch": branch, "precision": precision}
            if args.bank is not None:
                bank = read_memory_bank(args.bank, identity, device)
                check_bank_shape(bank, branch, model, args.bank)
            else:
                bank = build_memory_bank(model, support_images, args.batch_size, precision, branches=(branch,))
                if args.save_bank is not None:
                    save_memory_bank(bank, branch, identity, args.save_bank)
                    print(f"memory bank of {args.support} ({support_images.shape[0]} augmented images) -> {args.save_bank}")
        for note in clip_notes + scoring.notes:
            print(note)
        scorer = FewShotScorer(text_features, settings.has_masks, bank) if few_shot else ZeroShotScorer(
            text_features, settings.has_masks)
        rows, failed = _score_images(args, images, masks, settings, scoring, scorer, model, precision, staging, report)
        _write_outputs(staging, rows, args, ckpt, clip, mode, settings, scoring, failed, images)

    threshold = scoring.threshold
    flagged = sum(1 for row in rows if row[2] == "abnormal")
    summary = f"{len(rows)} images scored ({mode})"
    if threshold is not None:
        summary += f": {flagged} abnormal, {len(rows) - flagged} normal at threshold {threshold:.4f}"
    if failed:
        summary += f"; {failed} failed"
    print(f"{summary} -> {args.output_dir}")
    return 1 if failed else 0


def _score_images(args, images, masks, settings, scoring, scorer, model, precision, folder, report):
    """Score `images` in chunks; write each overlay into `folder`. (CSV rows, number of failures)."""
    names = dict(zip(images, _overlay_names(images)))
    threshold = scoring.threshold
    # The image threshold is also a threshold on the map when the score is the map's maximum (few-shot
    # with masks, under the same statistics): the predicted region is then where the map >= it.
    pixel_threshold = threshold if scorer.score_is_map_max and scoring.calibrated else None
    rows, failed = [], 0
    for start in range(0, len(images), CHUNK):
        chunk, tensors = [], []
        for path in images[start : start + CHUNK]:
            try:
                tensors.append((load_image(path, settings.img_size) * PIXEL_LEVELS).round().to(torch.uint8))
                chunk.append(path)
            except DatasetError as err:
                report(f"error: {single_line(err)}")
                failed += 1
        if not chunk:
            continue
        count = len(chunk)
        data = TensorSet(
            torch.stack(tensors), torch.zeros(count, settings.img_size, settings.img_size, dtype=torch.bool),
            torch.zeros(count, dtype=torch.long), [str(p) for p in chunk],
        )
        result = evaluate(model, scorer, data, scoring.normalization, batch_size=args.batch_size, precision=precision,
                          desc="predicting", keep_maps=True, metrics=False)
        for index, path in enumerate(chunk):
            score = float(result.image_scores[index])
            image_map = result.maps[index]
            decision = "" if threshold is None else ("abnormal" if score >= threshold else "normal")
            overlay_name = ""
            if not args.no_overlays:
                mask, problem = _mask_for(masks, path, settings.img_size)
                if problem:
                    report(f"error: {problem}")
                    failed += 1
                if scoring.calibrated:
                    value_range = (0.0, 1.0)
                    scale = "map (checkpoint normalisation; values above 1 shown as 1)"
                else:  # raw values: each overlay spans its own map's range
                    value_range = (float(image_map.min()), float(image_map.max()))
                    scale = "raw map (no statistics in the checkpoint), this image's min to max"
                overlay_name = names[path]
                picture = overlay(data.images[index], image_map, mask, value_range, figure=True, name=path.name,
                                  score=score, threshold=threshold, pixel_threshold=pixel_threshold, scale=scale)
                save_png(picture, folder / overlay_name)
            rows.append([str(path), f"{score:.8f}", decision, f"{float(image_map.max()):.8f}", overlay_name])
            print(f"{path}: score {score:.4f}" + (f" {decision}" if decision else ""))
    return rows, failed


def _mask_for(masks: MaskFinder, image: Path, size: int) -> tuple[torch.Tensor | None, str | None]:
    path = masks.find(image)
    if path is None:
        return None, None
    try:
        with Image.open(path) as mask_file, Image.open(image) as image_file:
            if mask_file.size != image_file.size:
                return None, (f"mask {path} is {mask_file.size[0]}x{mask_file.size[1]} but its image {image} is "
                              f"{image_file.size[0]}x{image_file.size[1]}: contour not drawn")
        return load_mask(path, size)[0], None
    except (OSError, DatasetError) as err:
        return None, f"cannot read mask {path}: {single_line(err)} (contour not drawn)"


def _write_outputs(folder, rows, args, ckpt, clip, mode, settings, scoring, failed, images) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "decision", "map_max", "overlay"])
    writer.writerows(rows)
    write_text_atomic(folder / PREDICTIONS_FILE, buffer.getvalue())
    summary = {
        "checkpoint": str(ckpt),
        "clip_ckpt": str(clip.path),
        "clip_ckpt_source": clip.source,
        "mode": mode,
        "support": args.support,
        "bank": args.bank,
        "model_name": settings.model_name,
        "img_size": settings.img_size,
        "features_list": list(settings.features_list),
        "object_word": settings.object_word,
        "has_masks": settings.has_masks,
        "normalization": scoring.normalization.to_dict(),
        "threshold": scoring.threshold,
        "threshold_source": scoring.threshold_source,
        "images": len(images),
        "scored": len(rows),
        "abnormal": sum(1 for row in rows if row[2] == "abnormal"),
        "failed": failed,
    }
    write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
