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

Outputs in --output_dir: predictions.csv (path, score, decision, map_max, overlay), one
`<stem>_overlay.png` per image (heatmap over the image; the mask's contour with --masks) and
predict.json (the settings used). Files in the input folder that are not images are reported
("skipped notes.txt: not an image") and skipped; hidden files and sub-folders are ignored. An
unreadable image is reported on one line and skipped; the exit code is then 1 (0 when every image
was scored, 2 for bad flags, checkpoints or support images).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from CLIP.errors import CLIPError
from dataset.errors import DatasetError
from dataset.medical import IMAGE_SUFFIXES, Sample, load_image, load_mask

from .augment import augment
from .calibration import stored_normalization
from .cli import resolve_device
from .engine import build_adapted_model, write_atomic
from .errors import MVFAError
from .evaluation import (
    PIXEL_LEVELS,
    Normalization,
    TensorSet,
    bank_branch,
    build_memory_bank,
    check_bank_file,
    evaluate,
    read_memory_bank,
    save_memory_bank,
)
from .model import read_checkpoint
from .text import default_cache_dir
from .visualize import overlay, save_png

USER_ERRORS = (CLIPError, DatasetError, MVFAError)
CHUNK = 32  # images decoded and scored at a time
RELEASE_HINT = (
    "the release's checkpoints: --model_name ViT-L-14-336 --img_size 240 --features_list 6 12 18 24, "
    "--has_masks 1 for Brain, Liver and Retina_RESC, 0 for the others"
)


@dataclass
class ModelSettings:
    """What the adapters were trained with: from the checkpoint's metadata, flags override or fill in."""

    model_name: str
    img_size: int
    features_list: tuple[int, ...]
    quick_gelu: bool | None
    object_word: str | None
    has_masks: bool | None


# (settings field, meta key, flag)
_FACTS = (
    ("model_name", "model_name", "--model_name"),
    ("img_size", "img_size", "--img_size"),
    ("features_list", "features_list", "--features_list"),
    ("object_word", "object_word", "--prompt_name"),
    ("has_masks", "has_masks", "--has_masks"),
)


def add_model_flags(parser: argparse.ArgumentParser, runtime: bool = True) -> None:
    """Flags that override the checkpoint's metadata, or stand in for it (release checkpoints).

    runtime False (export): no --device and --precision.
    """
    group = parser.add_argument_group("model (default: the checkpoint's metadata)")
    group.add_argument("--clip_ckpt", default=None, help="CLIP weights (default: CLIP/ckpt/<OpenAI file of the model>)")
    group.add_argument("--model_name", default=None, help="CLIP config name or JSON path")
    group.add_argument("--img_size", type=int, default=None, help="model input size")
    group.add_argument("--features_list", type=int, nargs="+", default=None, help="adapter stages (1-indexed blocks)")
    group.add_argument("--prompt_name", default=None, help="object word of the prompts (e.g. 'Brain', 'knee MRI')")
    group.add_argument("--has_masks", type=int, choices=(0, 1), default=None,
                       help="1: the adapters were trained with pixel masks (seg maps; few-shot score = max of the map); "
                            "0: without (det scores)")
    group.add_argument("--quick_gelu", action="store_true", default=None, help="OpenAI's QuickGELU (default: as trained)")
    if runtime:
        group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
        group.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None, help="autocast on CUDA (default fp16 there)")
    group.add_argument("--cache_dir", default=None, help="text-feature cache (default $MVFA_CACHE_DIR or ~/.cache/mvfa; 'none' disables)")


def resolve_settings(args: argparse.Namespace, meta: dict, source: str, needed: tuple[str, ...]) -> ModelSettings:
    """Flags first, then the checkpoint's metadata; the `needed` facts missing from both give one error line."""
    flags = {
        "model_name": args.model_name,
        "img_size": args.img_size,
        "features_list": tuple(args.features_list) if args.features_list else None,
        "object_word": getattr(args, "prompt_name", None),
        "has_masks": None if getattr(args, "has_masks", None) is None else bool(args.has_masks),
    }
    values, missing = {}, []
    for name, key, flag in _FACTS:
        value = flags[name] if flags[name] is not None else meta.get(key)
        if name == "features_list" and value is not None:
            value = tuple(int(v) for v in value)
        values[name] = value
        if value is None and name in needed:
            missing.append(flag)
    if missing:
        what = "has no metadata (a release checkpoint?)" if not meta else "has no " + ", ".join(m.lstrip("-") for m in missing) + " in its metadata"
        raise MVFAError(f"{source} {what}: pass {', '.join(missing)} ({RELEASE_HINT})")
    quick_gelu = args.quick_gelu if args.quick_gelu is not None else meta.get("quick_gelu")
    return ModelSettings(
        model_name=str(values["model_name"]) if values["model_name"] is not None else None,
        img_size=int(values["img_size"]) if values["img_size"] is not None else None,
        features_list=values["features_list"],
        quick_gelu=None if quick_gelu is None else bool(quick_gelu),
        object_word=values["object_word"],
        has_masks=values["has_masks"],
    )


def read_adapters(path: Path) -> tuple[dict, dict]:
    """(adapter state, metadata dict: empty for the release's checkpoints)."""
    state = read_checkpoint(path)
    meta = state.get("meta")
    return state, meta if isinstance(meta, dict) else {}


def build(args: argparse.Namespace, settings: ModelSettings, state: dict, source: str):
    """The adapted model with the checkpoint's adapters, its text bank and the device, precision."""
    device = resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    cache_dir = None if args.cache_dir == "none" else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model, text_bank = build_adapted_model(
        settings.model_name, settings.img_size, settings.features_list, Path(args.clip_ckpt) if args.clip_ckpt else None,
        "openai", settings.quick_gelu, device, cache_dir, visual_fp32_later=True,
    )
    model.load_adapter_state(state, source=source)
    model.eval()
    return model, text_bank, device, precision


# ------------------------------------------------------------------------------------------------
# Inputs


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, report) -> list[Path]:
    """Image files directly in `folder`, by name; other files reported through `report` and skipped."""
    images = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.is_dir():
            continue
        if is_image_name(path):
            images.append(path)
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
    if not is_image_name(path):
        raise MVFAError(f"--input {path} is not an image (image files end in {'/'.join(IMAGE_SUFFIXES)})")
    return [path]


class MaskFinder:
    """Masks of --masks by the image's file name, else by its stem (one mask of that stem)."""

    def __init__(self, folder: Path | None) -> None:
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        if folder is None:
            return
        if not folder.is_dir():
            raise MVFAError(f"--masks {folder} is not a folder")
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith(".") and is_image_name(path):
                self.by_name[path.name] = path
                self.by_stem.setdefault(path.stem, []).append(path)

    def find(self, image: Path) -> Path | None:
        if image.name in self.by_name:
            return self.by_name[image.name]
        candidates = self.by_stem.get(image.stem, [])
        return candidates[0] if len(candidates) == 1 else None


def load_support(folder: Path, img_size: int, report) -> torch.Tensor:
    """The support folder's normal images, augmented 11 times as training's memory bank ([11 k, 3, S, S])."""
    if not folder.is_dir():
        raise MVFAError(f"--support {folder} is not a folder of normal images")
    paths = list_images(folder, report)
    if not paths:
        raise MVFAError(f"--support {folder} holds no image ({'/'.join(IMAGE_SUFFIXES)} files)")
    support = TensorSet.load([Sample(path=p, label=0) for p in paths], img_size, desc="support")
    images, _ = augment(support.images.float() / PIXEL_LEVELS)  # as engine.prepare_few_shot
    return images


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvfa.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="adapter checkpoint (train_few/train_zero output, or the release's)")
    parser.add_argument("--input", required=True, help="an image, or a folder of images (not searched recursively)")
    parser.add_argument("--output_dir", required=True, help="where predictions.csv, the overlays and predict.json go")
    parser.add_argument("--support", default=None, help="folder of normal images: few-shot scoring (else zero-shot)")
    parser.add_argument("--save_bank", default=None, metavar="PATH",
                        help="with --support: also write the memory bank built from it, for later --bank runs")
    parser.add_argument("--bank", default=None, metavar="PATH",
                        help="few-shot scoring from a bank written by --save_bank (instead of --support; "
                             "same checkpoint, CLIP weights and settings)")
    parser.add_argument("--masks", default=None, help="folder of masks (by file name or stem) drawn as contours")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--no_overlays", action="store_true", help="write the CSV only")
    add_model_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


def predict(args: argparse.Namespace) -> int:
    def report(line: str) -> None:
        print(line, file=sys.stderr)

    if args.batch_size < 1:
        raise MVFAError(f"--batch_size {args.batch_size} is invalid: use 1 or more")
    ckpt = Path(args.ckpt)
    state, meta = read_adapters(ckpt)
    settings = resolve_settings(args, meta, str(ckpt), tuple(name for name, _, _ in _FACTS))
    if args.bank is not None and args.support is not None:
        raise MVFAError("--bank and --support both given: a saved bank replaces the support folder; pass one")
    if args.save_bank is not None and args.support is None:
        raise MVFAError("--save_bank needs --support FOLDER (the normal images the bank is built from)")
    if args.bank is not None:  # before the model is built
        check_bank_file(args.bank)
    images = input_images(Path(args.input), report)
    masks = MaskFinder(Path(args.masks) if args.masks else None)
    few_shot = args.support is not None or args.bank is not None
    mode = "few-shot" if few_shot else "zero-shot"

    # Statistics and threshold: the checkpoint's when they fit this scoring mode.
    normalization, notes = None, []
    stored = stored_normalization(meta, str(ckpt))
    if stored is not None and not stored.missing(few_shot, settings.has_masks):
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
        if stored_value is not None and meta.get("mode") == mode and calibrated:
            threshold, threshold_source = float(stored_value), f"checkpoint ({meta.get('threshold_rule')} on valid)"
        elif stored_value is not None and meta.get("mode") != mode:
            notes.append(f"note: the checkpoint's threshold is for {meta.get('mode')} scoring "
                         f"({'with' if meta.get('mode') == 'few-shot' else 'without'} --support): decisions left empty; pass --threshold")
        else:
            notes.append("note: no threshold for these scores: decisions left empty; pass --threshold")

    output_dir = Path(args.output_dir)
    model, text_bank, device, precision = build(args, settings, state, str(ckpt))
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
        else:
            support_images = load_support(Path(args.support), settings.img_size, report)
            bank = build_memory_bank(model, support_images, args.batch_size, precision, branches=(branch,))
            if args.save_bank is not None:
                save_memory_bank(bank, branch, identity, args.save_bank)
                print(f"memory bank of {args.support} ({support_images.shape[0]} augmented images) -> {args.save_bank}")
    for note in notes:
        print(note)

    stems = Counter(p.stem for p in images)
    shared_stems = {stem for stem, n in stems.items() if n > 1}
    rows, failed = [], 0
    for start in range(0, len(images), CHUNK):
        chunk, tensors = [], []
        for path in images[start : start + CHUNK]:
            try:
                tensors.append((load_image(path, settings.img_size) * PIXEL_LEVELS).round().to(torch.uint8))
                chunk.append(path)
            except DatasetError as err:
                report(f"error: {_one_line(err)}")
                failed += 1
        if not chunk:
            continue
        count = len(chunk)
        data = TensorSet(
            torch.stack(tensors), torch.zeros(count, settings.img_size, settings.img_size, dtype=torch.bool),
            torch.zeros(count, dtype=torch.long), [str(p) for p in chunk],
        )
        result = evaluate(
            model, data, text_features, settings.has_masks, bank, args.batch_size, precision, desc="predicting",
            normalization=normalization, keep_maps=True, metrics=False,
        )
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
                if calibrated:
                    value_range = (0.0, 1.0)
                else:  # raw values: each overlay spans its own map's range
                    value_range = (float(image_map.min()), float(image_map.max()))
                overlay_name = _overlay_name(path, shared_stems)
                save_png(overlay(data.images[index], image_map, mask, value_range), output_dir / overlay_name)
            rows.append([str(path), f"{score:.8f}", decision, f"{float(image_map.max()):.8f}", overlay_name])
            print(f"{path}: score {score:.4f}" + (f" {decision}" if decision else ""))

    _write_outputs(output_dir, rows, args, ckpt, mode, settings, normalization, threshold, threshold_source, failed, images)
    flagged = sum(1 for row in rows if row[2] == "abnormal")
    summary = f"{len(rows)} images scored ({mode})"
    if threshold is not None:
        summary += f": {flagged} abnormal, {len(rows) - flagged} normal at threshold {threshold:.4f}"
    if failed:
        summary += f"; {failed} failed"
    print(f"{summary} -> {output_dir}")
    return 1 if failed else 0


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
        return None, f"cannot read mask {path}: {_one_line(err)} (contour not drawn)"


def _overlay_name(path: Path, shared_stems: set[str]) -> str:
    """<stem>_overlay.png; <stem>_<suffix>_overlay.png when several inputs share the stem (a.png, a.jpg)."""
    if path.stem in shared_stems:
        return f"{path.stem}_{path.suffix.lstrip('.')}_overlay.png"
    return f"{path.stem}_overlay.png"


def _write_outputs(output_dir, rows, args, ckpt, mode, settings, normalization, threshold, threshold_source, failed, images):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "decision", "map_max", "overlay"])
    writer.writerows(rows)
    write_atomic(output_dir / "predictions.csv", buffer.getvalue())
    summary = {
        "checkpoint": str(ckpt),
        "mode": mode,
        "support": args.support,
        "bank": args.bank,
        "model_name": settings.model_name,
        "img_size": settings.img_size,
        "features_list": list(settings.features_list),
        "object_word": settings.object_word,
        "has_masks": settings.has_masks,
        "normalization": normalization.to_dict(),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "images": len(images),
        "scored": len(rows),
        "abnormal": sum(1 for row in rows if row[2] == "abnormal"),
        "failed": failed,
    }
    write_atomic(output_dir / "predict.json", json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
