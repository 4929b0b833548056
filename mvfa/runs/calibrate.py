"""Calibration: fixed normalisation statistics and a decision threshold from valid data.

After training, `calibrate` fits fixed normalisation statistics on valid normal images (not the
support) and chooses a decision threshold on valid data; both go into the checkpoint's `meta`
(plain data), and `stored_normalization` / `stored_threshold` read them back, so that test runs
and mvfa.predict can score new images one at a time.

The functions read their settings from any object with the fields of `CalibrationSettings`
(mvfa.runs.config.RunConfig has them).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dataset.errors import DatasetError
from dataset.medical import MedicalDataset, Sample
from dataset.tensors import TensorSet

from mvfa.calibration.normalization import Normalization
from mvfa.calibration.thresholds import choose_threshold
from mvfa.method.evaluation import evaluate, fit_normalization
from mvfa.method.model import AdaptedViT
from mvfa.method.scorer import Scorer, ScoringMode
from mvfa.runtime.distributed import SINGLE, Dist
from mvfa.runtime.errors import MVFAError


# how a stored threshold's number reads: scores under the fitted statistics, not probabilities
SCORE_SCALE = "on the checkpoint's score scale (valid normal images span about 0 to 1; anomalies score higher)"


class CalibrationSettings(Protocol):
    """The run settings calibration reads (mvfa.runs.config.RunConfig has them)."""

    mode: str  # "few-shot" or "zero-shot"
    img_size: int
    num_workers: int
    eval_batch_size: int
    precision: str
    threshold_rule: str  # f1 or fpr
    target_fpr: float


def reference_samples(config: CalibrationSettings, dataset: MedicalDataset, support: list[Sample]) -> tuple[list[Sample], str]:
    """The valid images that calibrate a model, and their description.

    Few-shot: the valid split minus the support images. Zero-shot: the target's own valid split
    (never seen in zero-shot training; its labels are used for the threshold only).
    """
    used = {s.path for s in support}
    samples = [s for s in dataset.samples("valid") if s.path not in used]
    if config.mode == "few-shot":
        return samples, f"{dataset.name} valid minus the {len(used)} support images"
    return samples, f"{dataset.name} valid (the zero-shot target's own valid split, unseen in training)"


def fit_reference(
    config: CalibrationSettings, model: AdaptedViT, dataset: MedicalDataset, scorer: Scorer, support: list[Sample],
    dist: Dist = SINGLE,
) -> tuple[TensorSet, Normalization, str]:
    """Fit the normalisation on the normal reference images; returns (all reference images, statistics, description)."""
    samples, what = reference_samples(config, dataset, support)
    normal = [i for i, s in enumerate(samples) if s.label == 0]
    if not normal:
        raise MVFAError(f"{what} holds no normal image to fit the normalisation on")
    data = TensorSet.load(samples, config.img_size, config.num_workers, desc="reference")
    norm = fit_normalization(
        model, scorer, data.subset(normal), batch_size=config.eval_batch_size, precision=config.precision,
        source=f"{len(normal)} normal images of {what}", dist=dist,
    )
    return data, norm, what


def calibrate(
    config: CalibrationSettings, model: AdaptedViT, dataset: MedicalDataset, scorer: Scorer, support: list[Sample],
    dist: Dist = SINGLE, fit: Callable[[], tuple[TensorSet, Normalization, str]] | None = None,
) -> dict:
    """Checkpoint metadata of the calibration: normalisation statistics, threshold, rule, valid counts.

    Without usable valid data (no valid split, no normal image left) it prints a note and records
    why; the checkpoint then has no statistics (predict uses raw scores and needs --threshold).
    `fit`: fit_reference of these arguments, made by the caller (which keeps its result).
    """
    try:
        data, norm, what = fit() if fit is not None else fit_reference(config, model, dataset, scorer, support, dist)
    except (DatasetError, MVFAError) as err:
        print(f"note: no calibration: {err}")
        return {"normalization": None, "threshold": None, "calibration": {"skipped": str(err)}}
    result = evaluate(model, scorer, data, norm, batch_size=config.eval_batch_size, precision=config.precision,
                      desc="calibration", metrics=False, dist=dist)
    rule = config.threshold_rule
    abnormal = int(result.labels.sum())
    if rule == "f1" and abnormal == 0:
        print(f"note: {what} holds no abnormal image: threshold by the FPR rule (target {config.target_fpr}) instead of F1")
        rule = "fpr"
    choice = choose_threshold(result.image_scores, result.labels, rule, config.target_fpr)
    reference = choice["reference"]
    how = "best F1" if rule == "f1" else f"at most {config.target_fpr:g} of normal images flagged"
    print(
        f"calibration: normalisation fitted on {norm.source}; threshold {choice['threshold']:.4f} {SCORE_SCALE} ({how} on "
        f"{len(result.labels)} valid images: precision {reference['precision']:.4f}, recall {reference['recall']:.4f}, "
        f"F1 {reference['f1']:.4f}, FPR {reference['fpr']:.4f})"
    )
    return {
        "normalization": norm.to_dict(),
        "threshold": float(choice["threshold"]),
        "threshold_rule": rule,
        "target_fpr": float(config.target_fpr) if rule == "fpr" else None,
        "calibration": {
            "data": what,
            "n_normal": len(result.labels) - abnormal,
            "n_abnormal": abnormal,
            **{f"valid_{k}": v for k, v in reference.items()},
        },
    }


def stored_normalization(meta: dict, source: str) -> Normalization | None:
    """The checkpoint's normalisation statistics, or None when it has none."""
    entry = meta.get("normalization") if isinstance(meta, dict) else None
    return None if entry is None else Normalization.from_dict(entry, f"the normalisation stored in {source}")


def stored_threshold(meta: dict, source: str, scoring: ScoringMode) -> tuple[float, Normalization] | None:
    """(threshold, its statistics) when the checkpoint has a threshold that applies to this scoring.

    Malformed statistics only give a note here (the release's protocol does not need them).
    """
    try:
        norm = stored_normalization(meta, source)
    except MVFAError as err:
        print(f"note: threshold not reported: {err}")
        return None
    threshold = meta.get("threshold") if isinstance(meta, dict) else None
    if norm is None or threshold is None or meta.get("mode") != scoring.mode or norm.missing(scoring.normalization_branches):
        return None
    return float(threshold), norm
