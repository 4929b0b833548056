"""Decision thresholds on image scores: the rules (best F1, a target false-positive rate) and their counts."""
from __future__ import annotations

import math

import numpy as np

from mvfa.choices import THRESHOLD_RULES
from mvfa.runtime.errors import MVFAError

def threshold_metrics(scores, labels, threshold: float) -> dict:
    """Counts and rates of the decision `score >= threshold` (abnormal) against labels (1 abnormal)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    predicted = scores >= threshold
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
    }


def _between(upper: float, lower: float) -> float:
    """A value in (lower, upper]: their midpoint, or `upper` when no float lies strictly between."""
    middle = (upper + lower) / 2
    return middle if lower < middle <= upper else upper


def choose_threshold(scores, labels, rule: str = "f1", target_fpr: float = 0.05) -> dict:
    """A decision threshold (abnormal when score >= threshold) from scored reference images.

    f1: the threshold of the best F1 (ties: the highest), placed midway to the next lower score so
        that the reference decisions stay the same; needs normal and abnormal images.
    fpr: the lowest threshold at which at most `target_fpr` of the normal images are flagged
        (midway to the next normal score; just above the highest one when none may be flagged).
    Returns {"threshold", "rule", "target_fpr" (fpr), "reference": threshold_metrics on the images}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if rule not in THRESHOLD_RULES:
        raise MVFAError(f"--threshold_rule {rule!r} is not known: choose one of {', '.join(THRESHOLD_RULES)}")
    normal = np.sort(scores[~labels])
    if rule == "f1":
        positives = np.sort(scores[labels])
        if len(positives) == 0 or len(normal) == 0:
            raise MVFAError("the F1 threshold needs normal and abnormal reference images")
        candidates = np.unique(scores)[::-1]  # descending
        tp = len(positives) - np.searchsorted(positives, candidates, side="left")
        fp = len(normal) - np.searchsorted(normal, candidates, side="left")
        f1 = 2 * tp / (tp + fp + len(positives))
        best = int(np.argmax(f1))  # the first maximum: the highest threshold among ties
        threshold = float(candidates[best])
        if best + 1 < len(candidates):
            threshold = _between(threshold, float(candidates[best + 1]))
        detail = {"threshold": threshold, "rule": "f1"}
    else:
        if not 0.0 < target_fpr < 1.0:
            raise MVFAError(f"--target_fpr {target_fpr} is invalid: use a rate between 0 and 1 (e.g. 0.05)")
        if len(normal) == 0:
            raise MVFAError("the FPR threshold needs normal reference images")
        allowed = int(math.floor(target_fpr * len(normal) + 1e-9))  # normal images that may be flagged
        cut = float(normal[len(normal) - allowed - 1])  # the highest normal score that must stay below
        above = normal[normal > cut]
        threshold = _between(float(above[0]), cut) if len(above) else float(np.nextafter(cut, np.inf))
        if threshold <= cut:
            threshold = float(np.nextafter(cut, np.inf))
        detail = {"threshold": threshold, "rule": "fpr", "target_fpr": float(target_fpr)}
    detail["reference"] = threshold_metrics(scores, labels, threshold)
    return detail
