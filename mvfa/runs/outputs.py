"""Where a run writes and what: the checks of the output places before any work, metrics.json,
predictions.csv, train_log.csv, the support list, the release's printed lines and the overlay figures."""
from __future__ import annotations

import csv
from dataclasses import asdict
import io
import json
from pathlib import Path

import numpy as np
import torch

from dataset.medical import write_seed_file
from dataset.tensors import TensorSet

from mvfa.calibration.thresholds import threshold_metrics
from mvfa.method.evaluation import EvalResult
from mvfa.runs.calibrate import SCORE_SCALE
from mvfa.runs.checkpoints import support_names
from mvfa.runs.config import TRAINING_ONLY, TRAINING_SETTINGS, RunConfig
from mvfa.runs.visualize import overlay, save_png
from mvfa.runtime.distributed import Dist, gather_objects
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import nearest_existing, writable_folder, write_text_atomic

RESULT_FILES = ("metrics.json", "predictions.csv", "train_log.csv")


def check_output_folder(folder: Path, flag: str) -> None:
    """`folder` is, or can be made as, a folder this process may write in; a folder without write bits
    is read-only even for root (who could write there): that is what clearing them asks for."""
    if folder.exists() and not folder.is_dir():
        raise MVFAError(f"{flag} {folder} is a file, not a folder: pass a folder (it is made when missing)")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise MVFAError(f"{flag} {folder} cannot be made: {existing} is a file, not a folder; choose another path")
    if not writable_folder(existing):
        where = "is read-only" if folder.exists() else f"cannot be made: {existing} is read-only"
        raise MVFAError(f"{flag} {folder} {where} (no write permission): make it writable or choose another folder")


def check_outputs(config: RunConfig) -> None:
    """Before any work: every place the run writes (--output_dir and its result files, --save_path and
    the checkpoint) can take what the run writes there, so that no error waits until the end."""
    check_output_folder(config.output_dir, "--output_dir")
    files = [config.output_dir / name for name in RESULT_FILES]
    if config.mode == "few-shot":
        files.append(config.output_dir / f"{config.shot}-shot.txt")
    if config.train and config.save_model:
        check_output_folder(config.save_path, "--save_path")
        files.append(config.save_path / config.checkpoint_name())
    for path in files:
        if path.exists() and not path.is_file():  # a file cannot be renamed onto it
            raise MVFAError(f"{path} is not a file, and this run writes a file there: move it away or choose another folder")
    maps = config.output_dir / "maps"
    if config.save_maps is not None and maps.exists() and not maps.is_dir():
        raise MVFAError(f"{maps} is a file, and --save_maps writes a folder there: move it away or choose another "
                        "--output_dir")


def predictions_csv(result: EvalResult, data_root: Path) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    for path, label, score in zip(result.paths, result.labels, result.image_scores):
        writer.writerow([_shown(path, data_root), int(label), f"{float(score):.8f}"])
    return buffer.getvalue()


def _shown(path, data_root: Path) -> str:
    """A path relative to the data folder when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _log_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def json_ready(config: RunConfig) -> dict:
    raw = asdict(config)
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "fewshot_seed_dirs" else v) for k, v in raw.items()}


def print_release_lines(obj: str, metrics: dict) -> None:
    print(f"{obj} AUC : {round(metrics['image_auroc'], 4)}")
    if "pixel_auroc" in metrics:
        print(f"{obj} pAUC : {round(metrics['pixel_auroc'], 4)}")


MAP_SCALES = {
    "test": "map (min-max over the test set)", "valid": "map (valid normalisation)",
    "checkpoint": "map (checkpoint normalisation)",
}


def map_overlays(
    config: RunConfig, result: EvalResult, data: TensorSet, maps_of, folder: Path, threshold: float | None = None,
    score_is_map_max: bool = False,
) -> list[Path]:
    """Overlay figures of the test images (every one, or the --save_maps N highest and N lowest) and an index.csv.

    `maps_of(indices)` gives the maps of the chosen images ([n, S, S], on the run's normalised scale),
    or None on a rank that writes nothing (several ranks call this together: maps_of is collective).
    `threshold`: the checkpoint's decision threshold; each figure then states the decision, on the
    scores it applies to (`result.fixed_scores` when the maps are on another normalisation), and
    maps whose maximum is the image score (`score_is_map_max`: few-shot with masks) show the region above it.
    """
    on_threshold_scale = result.fixed_scores is None
    decision_scores = np.asarray(result.image_scores if on_threshold_scale else result.fixed_scores)
    pixel_threshold = threshold if on_threshold_scale and score_is_map_max else None
    scores = np.asarray(result.image_scores)
    count = len(scores)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(count, dtype=int)
    rank[order] = np.arange(1, count + 1)
    n = config.save_maps or 0
    if n <= 0 or 2 * n >= count:
        chosen = [(int(i), "") for i in range(count)]
    else:
        chosen = [(int(i), f"high{r + 1:02d}_") for r, i in enumerate(order[:n])]
        chosen += [(int(i), f"low{r + 1:02d}_") for r, i in enumerate(order[::-1][:n])]
    maps = maps_of([i for i, _ in chosen])
    if maps is None:
        return []
    used: set[str] = set()
    rows = [["file", "path", "label", "score", "rank"]]
    written = []
    for (index, prefix), image_map in zip(chosen, maps):
        path = Path(result.paths[index])
        kind = "abnormal" if int(result.labels[index]) else "normal"
        name = f"{prefix}{kind}_{path.stem}.png"
        if name in used:
            name = f"{prefix}{kind}_{path.stem}_{path.suffix.lstrip('.')}.png"
        used.add(name)
        mask = data.masks[index] if result.masks is not None and int(result.labels[index]) else None
        figure = overlay(
            data.images[index], image_map, mask, (0.0, 1.0), figure=True, name=path.name,
            score=float(decision_scores[index]), label=int(result.labels[index]), threshold=threshold,
            pixel_threshold=pixel_threshold, scale=MAP_SCALES[config.normalize],
        )
        written.append(save_png(figure, folder / name))
        rows.append([name, _shown(path, config.data_path), int(result.labels[index]), f"{float(scores[index]):.8f}", int(rank[index])])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(folder / "index.csv", buffer.getvalue())
    return written


def rows_of_maps(maps: torch.Tensor, map_range: tuple[int, int], indices: list[int], dist: Dist) -> torch.Tensor | None:
    """The maps of images `indices` (in that order) on rank 0, from the ranks that hold them; None elsewhere."""
    start, stop = map_range
    if not dist.active:
        return maps[[i - start for i in indices]]
    rows = {i: maps[i - start].cpu() for i in indices if start <= i < stop}
    gathered = gather_objects(rows, dist)
    if gathered is None:
        return None
    merged = {i: row for part in gathered for i, row in part.items()}
    return torch.stack([merged[i] for i in indices]) if indices else maps.new_empty((0, *maps.shape[1:])).cpu()


def run_payload(
    config: RunConfig, metrics: dict, result: EvalResult, checkpoint_path: Path | None, meta: dict, support,
    best_state: dict | None, dist: Dist,
) -> dict:
    """metrics.json: the metrics, the settings (a test run: the checkpoint's training settings), the support."""
    payload = {
        "obj": config.obj,
        "mode": config.mode,
        "script": ("train" if config.train else "test") + ("_few" if config.mode == "few-shot" else "_zero"),
        "metrics": metrics,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "normalization": {"mode": config.normalize, **result.normalization.to_dict()},
        "config": json_ready(config),
    }
    if best_state is None:  # the training settings are the checkpoint's, not this script's defaults
        for key in TRAINING_ONLY:
            payload["config"].pop(key, None)
        payload["training"] = {k: meta[k] for k in ("mode", "obj", "seed", "select", "best_epoch", "best_step",
                                                    "shot", "iterate", *TRAINING_SETTINGS) if k in meta}
    else:
        payload["training"] = {
            "epoch_losses": best_state["epoch_losses"], "best_epoch": best_state["epoch"], "best_step": best_state["step"],
        }
    if support is not None:
        payload["support"] = {"source": support.source, **support_names(support)}
    if config.ddp:
        payload["config"].update(world_size=dist.world_size, effective_batch_size=dist.world_size * config.batch_size)
    return payload


def threshold_report(result: EvalResult, value: float, under_other_statistics: bool, meta: dict) -> dict:
    """The checkpoint's threshold applied to the test images (on the scores it was chosen for); printed."""
    scores = result.fixed_scores if under_other_statistics else result.image_scores
    test = threshold_metrics(scores, result.labels, value)
    print(
        f"threshold {value:.4f} {SCORE_SCALE} ({meta.get('threshold_rule')} on valid): test precision "
        f"{test['precision']:.4f} recall {test['recall']:.4f} F1 {test['f1']:.4f} FPR {test['fpr']:.4f}"
    )
    return {"value": value, "rule": meta.get("threshold_rule"), "target_fpr": meta.get("target_fpr"),
            "normalization": "checkpoint", "test": test}


def write_run_files(config: RunConfig, result: EvalResult, payload: dict, log_rows: list[dict], support) -> None:
    """The run's files (rank 0): the support list, predictions.csv, train_log.csv, metrics.json."""
    if support is not None and config.iterate >= 0:  # written with the results: an early error leaves none
        seed_file = config.output_dir / f"{config.shot}-shot.txt"
        write_seed_file(seed_file, support, config.iterate)
        if config.only_normal:  # the draw as a whole keeps the file readable and the split the few-shot run's
            print(f"wrote {seed_file}: its a-{config.iterate} line names the drawn abnormal images, not used here")
    write_text_atomic(config.output_dir / "predictions.csv", predictions_csv(result, config.data_path))
    if log_rows:
        write_text_atomic(config.output_dir / "train_log.csv", _log_csv(log_rows))
    write_text_atomic(config.output_dir / "metrics.json", json.dumps(payload, indent=2) + "\n")
