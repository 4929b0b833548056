"""Section auroc: mvfa.metrics.pixel_auroc against sklearn's roc_auc_score (through `metrics.run`),
sklearn on a subsample, extrapolated n log n, where all scores would exceed the budget."""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import time

from . import metrics
from .common import Context
from .report import Row


def _sklearn_seconds(n: int) -> float:
    from sklearn.metrics import roc_auc_score

    scores, labels = metrics.make_data(n, 0.05, 1)
    start = time.perf_counter()
    roc_auc_score(labels, scores)
    return time.perf_counter() - start


def _nlogn(n: int) -> float:
    return n * math.log(max(n, 2))


def section_auroc(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    n = cfg.auroc_n
    pilot_n = min(n, 2_000_000)
    pilot = _sklearn_seconds(pilot_n)
    predicted = pilot * _nlogn(n) / _nlogn(pilot_n)
    sklearn_n = n
    if predicted > cfg.sklearn_budget_s:
        sklearn_n = max(pilot_n, int(n * cfg.sklearn_budget_s / predicted) // 1_000_000 * 1_000_000)
    args = argparse.Namespace(n=n, sklearn_n=sklearn_n, skip_sklearn=False, pos_rate=0.05, seed=0, repeat=1,
                              device="cuda" if ctx.device.type == "cuda" else "cpu", with_ap_f1=False, json=None)
    with contextlib.redirect_stdout(io.StringIO()):
        res = metrics.run(args)
    same = sklearn_n == n
    ours_same = res["pixel_auroc_s"] if same else res["pixel_auroc_sub_s"]
    where = "GPU (torch tensors)" if ctx.device.type == "cuda" else "CPU (numpy)"
    rows = [
        Row("scores", n, "", note=f"float32, 5% positives, many ties; pixel_auroc on the {where}"),
        Row("pixel_auroc s", res["pixel_auroc_s"], "s", note=f"{n:,} scores"),
        Row("sklearn roc_auc_score s", res["sklearn_s"], "s", note=f"{sklearn_n:,} scores"),
    ]
    if not same:
        extrapolated = res["sklearn_s"] * _nlogn(n) / _nlogn(sklearn_n)
        rows.append(Row("sklearn roc_auc_score s, extrapolated to all scores", extrapolated, "s",
                        note=f"n log n from {sklearn_n:,}: the full run would exceed the {cfg.sklearn_budget_s:g} s budget"))
        rows.append(Row("pixel_auroc s on sklearn's subsample", ours_same, "s"))
        rows.append(Row("speed-up vs sklearn, all scores (sklearn extrapolated)", extrapolated / res["pixel_auroc_s"], "x"))
    rows.append(Row("speed-up vs sklearn, same data", res["sklearn_s"] / ours_same, "x",
                    note=f"{sklearn_n:,} scores, wall clock"))
    rows.append(Row("|pixel_auroc - sklearn|, same data", res["abs_diff"], ""))
    rows.append(Row("pixel_auroc peak extra memory / scores size",
                    res["pixel_auroc_peak_extra_bytes"] / res["scores_bytes"], "x",
                    note=f"{res['pixel_auroc_peak_extra_bytes'] / 1e9:.3f} GB ({res['peak_extra_source']}) over "
                         f"{res['scores_bytes'] / 1e9:.3f} GB of scores"))
    return rows
