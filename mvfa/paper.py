"""The paper's published tables (AUC %, METHOD.md section 7), for side-by-side reports."""
from __future__ import annotations

from collections.abc import Iterable

# Dataset -> the name of its row in the paper's tables, in the paper's row order.
PAPER_ROWS: dict[str, str] = {
    "Histopathology": "HIS",
    "Chest": "ChestXray",
    "Retina_OCT2017": "OCT17",
    "Brain": "BrainMRI",
    "Liver": "LiverCT",
    "Retina_RESC": "RESC",
}

# (setting, metric) -> dataset -> AUC %; "loc" exists only for datasets with masks.
PAPER_AUC: dict[tuple[str, str], dict[str, float]] = {
    ("zero-shot", "det"): {"Histopathology": 77.90, "Chest": 71.11, "Retina_OCT2017": 95.40, "Brain": 78.63, "Liver": 76.24, "Retina_RESC": 83.31},
    ("zero-shot", "loc"): {"Brain": 90.27, "Liver": 97.85, "Retina_RESC": 92.05},
    ("4-shot", "det"): {"Histopathology": 82.71, "Chest": 81.95, "Retina_OCT2017": 99.38, "Brain": 92.44, "Liver": 81.18, "Retina_RESC": 96.18},
    ("4-shot", "loc"): {"Brain": 97.30, "Liver": 99.73, "Retina_RESC": 98.97},
}
# The paper's own average row: over all six datasets (det) or the three with masks (loc). A run on a
# subset compares with paper_mean over the same subset, never with these.
PAPER_AVERAGE: dict[tuple[str, str], float] = {
    ("zero-shot", "det"): 80.43,
    ("zero-shot", "loc"): 93.39,
    ("4-shot", "det"): 88.97,
    ("4-shot", "loc"): 98.67,
}


def paper_mean(column: tuple[str, str], datasets: Iterable[str]) -> float | None:
    """The paper's mean AUC (%) of `column` over exactly `datasets`; None when there are none or one has no value."""
    table = PAPER_AUC.get(column, {})
    values = [table.get(name) for name in datasets]
    if not values or any(value is None for value in values):
        return None
    return sum(values) / len(values)


def row_names(datasets: Iterable[str]) -> str:
    """'ChestXray, BrainMRI': the paper's row names of `datasets`, in the paper's order."""
    chosen = set(datasets)
    return ", ".join(row for name, row in PAPER_ROWS.items() if name in chosen)


def format_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# The settings the paper's tables were made with (the release's defaults, METHOD.md): a reproduce
# run titles its results "the paper's settings" only when every run used these, on all six
# datasets, with OpenAI's weights file (checked by its sha256).
PAPER_MODEL = "ViT-L-14-336"
PAPER_SETTINGS: dict[str, object] = {
    "model_name": PAPER_MODEL,
    "pretrain": "openai",
    "img_size": 240,
    "features_list": [6, 12, 18, 24],
    "epoch": 50,
    "batch_size": 1,
    "det_loss": "release",
}
PAPER_LEARNING_RATES: dict[str, float] = {"few-shot": 1e-3, "zero-shot": 1e-4}
