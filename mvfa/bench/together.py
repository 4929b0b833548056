"""Section reproduce: `python -m mvfa.reproduce` on the tiny backbone (2 datasets x 4 splits x both
protocols; --smoke: 1 split), three ways in one bench run: each run on its own (--one_by_one
--group_size 1), the protocols of a run trained together (--group_size 1), and the default (the
protocols together, the zero-shot targets in lockstep, and the k-shot splits of both datasets in
lockstep). Each way is timed BenchConfig.reproduce_repeats times, the ways interleaved, and its best
time kept: single runs on a shared 2-core machine move by 20%. With a second epoch count
(BenchConfig.reproduce_epochs), one by one and grouped are also timed at it: the difference is each
way's cost per further epoch, the ratio a longer schedule approaches (the one-off costs, the same for
both ways, weigh less and less: imports, models, test sets, final tests)."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time

import torch

from .children import REPO_ROOT, child_env
from .common import Context
from .library import TextFeatureBank, create_model, generate_benchmark, object_word, save_torch_atomic
from .report import Row

DATASETS = ("Brain", "Liver")  # leave-one-out needs two: each is the other's zero-shot source
SHOT = 2
TINY = {"model_name": "ViT-Tiny-14", "img_size": 56, "stages": (2, 4, 6, 8)}


def reproduce_seconds(ctx: Context, data, clip, out, epochs: int, *extra: str) -> float:
    """Wall seconds of one reproduce run of `epochs` epochs in a child process (its output kept in <out>.log)."""
    command = [
        sys.executable, "-m", "mvfa.reproduce", "--data_path", str(data), "--output_dir", str(out),
        "--model_name", TINY["model_name"], "--clip_ckpt", str(clip), "--img_size", str(TINY["img_size"]),
        "--features_list", *map(str, TINY["stages"]), "--device", ctx.cfg.device, "--shots", str(SHOT),
        "--splits", str(ctx.cfg.reproduce_splits), "--epoch", str(epochs),
        "--cache_dir", str(ctx.tmp / "reproduce-text-cache"),  # warmed before: the runs do not re-encode prompts
        "--fewshot_seed_dir", str(data / "no-seed-lists"), *extra,  # synthetic data: every split a seeded draw
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=child_env(ctx.cfg))
    seconds = time.perf_counter() - start
    out.with_suffix(".log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"reproduce {' '.join(extra)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def auroc_columns(results) -> dict[str, tuple[str, str]]:
    with open(results, newline="") as handle:
        return {row["run_dir"]: (row["image_auroc"], row["pixel_auroc"]) for row in csv.DictReader(handle)}


def max_difference(first: dict[str, tuple[str, str]], second: dict[str, tuple[str, str]]) -> float:
    """The largest |AUROC difference| over the runs both made (inf when they made other runs)."""
    if first.keys() != second.keys():
        return float("inf")
    return max((abs(float(a) - float(b)) for run in first for a, b in zip(first[run], second[run]) if a and b), default=0.0)


def section_reproduce(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    data = ctx.tmp / "reproduce-data"
    generate_benchmark(data, seed=0, image_size=64, n_valid=(SHOT + 3, SHOT + 3),
                       n_test=(cfg.reproduce_test_images // 2,) * 2, datasets=list(DATASETS))
    clip = ctx.tmp / "reproduce-tiny.pt"
    torch.manual_seed(0)
    clip_model = create_model(TINY["model_name"])
    save_torch_atomic(clip_model.state_dict(), clip)
    text = TextFeatureBank(clip_model, ctx.tmp / "reproduce-text-cache")  # every run then reads the same cache
    for name in DATASETS:
        text(object_word(name))
    del clip_model, text
    ways = {"one-by-one": ("--one_by_one", "--group_size", "1"), "shared": ("--group_size", "1"), "grouped": ()}
    first, *more = cfg.reproduce_epochs
    if len(more) > 1 or any(epochs <= first for epochs in more):
        raise ValueError(f"reproduce_epochs: one epoch count, or two increasing ones; got {cfg.reproduce_epochs}")
    timed = [(way, first) for way in ways] + [(way, epochs) for epochs in more for way in ("one-by-one", "grouped")]
    best = {key: float("inf") for key in timed}
    for repeat in range(cfg.reproduce_repeats):  # interleaved, so that a slow spell of the machine hits every way
        for way, epochs in timed:
            out = ctx.tmp / f"reproduce-{way}-{epochs}"
            if repeat:
                shutil.rmtree(out)  # a finished run would be reused
            best[way, epochs] = min(best[way, epochs], reproduce_seconds(ctx, data, clip, out, epochs, *ways[way]))
    alone, shared, grouped = best["one-by-one", first], best["shared", first], best["grouped", first]  # grouped: the default
    reference = auroc_columns(ctx.tmp / f"reproduce-one-by-one-{first}" / "results.csv")
    same = reference == auroc_columns(ctx.tmp / f"reproduce-shared-{first}" / "results.csv")
    apart = max_difference(reference, auroc_columns(ctx.tmp / f"reproduce-grouped-{first}" / "results.csv"))
    runs = len(DATASETS) * 2 * (1 + cfg.reproduce_splits)
    work = (f"{len(DATASETS)} datasets x (zero-shot + {SHOT}-shot x {cfg.reproduce_splits} splits) x 2 protocols = {runs} runs, "
            f"{first} epochs, {cfg.reproduce_test_images} test images each, tiny backbone, {cfg.device}; "
            f"best of {cfg.reproduce_repeats} interleaved runs of each way")
    rows = [
        Row("reproduce wall s, protocols one by one", alone, "s", note=work + "; --one_by_one --group_size 1"),
        Row("reproduce wall s, protocols trained together", shared, "s", note=f"{runs // 2} trainings; --group_size 1"),
        Row("reproduce wall s, runs grouped, protocols together", grouped, "s",
            note=f"the default: the {len(DATASETS)} zero-shot targets, and the {len(DATASETS) * cfg.reproduce_splits} "
                 "k-shot splits, in lockstep"),
        Row("reproduce speed-up, together vs one by one", alone / shared, "x",
            note="results equal (every run's AUROCs)" if same else "RESULTS DIFFER"),
        Row("reproduce speed-up, grouped vs one by one", alone / grouped, "x",
            note=f"largest |AUROC difference| {apart:.1e} (float rounding of the batched step)"),
    ]
    for epochs in more:
        apart = max_difference(auroc_columns(ctx.tmp / f"reproduce-one-by-one-{epochs}" / "results.csv"),
                               auroc_columns(ctx.tmp / f"reproduce-grouped-{epochs}" / "results.csv"))
        rows += further_epoch_rows((first, alone, grouped), (epochs, best["one-by-one", epochs], best["grouped", epochs]),
                                   apart)
    return rows


def further_epoch_rows(fewer: tuple[int, float, float], more: tuple[int, float, float], apart: float) -> list[Row]:
    """The rows of a second epoch count: `fewer` and `more` are (epochs, one-by-one s, grouped s); each
    way's seconds per further epoch is the difference over the extra epochs (what a longer schedule
    adds: the one-off costs are paid at both counts)."""
    (first, alone, grouped), (epochs, alone_more, grouped_more) = fewer, more
    alone_epoch, grouped_epoch = (alone_more - alone) / (epochs - first), (grouped_more - grouped) / (epochs - first)
    return [
        Row(f"reproduce wall s at {epochs} epochs, one by one", alone_more, "s", note="as above, another epoch count"),
        Row(f"reproduce wall s at {epochs} epochs, grouped", grouped_more, "s"),
        Row(f"reproduce speed-up at {epochs} epochs, grouped vs one by one", alone_more / grouped_more, "x",
            note=f"largest |AUROC difference| {apart:.1e}"),
        Row("reproduce s per further epoch, one by one", alone_epoch, "s",
            note=f"(wall at {epochs} epochs - at {first}) / {epochs - first}"),
        Row("reproduce s per further epoch, grouped", grouped_epoch, "s"),
        Row("reproduce speed-up per further epoch, grouped vs one by one",
            alone_epoch / grouped_epoch if grouped_epoch > 0 else None, "x",
            note="what a longer schedule approaches (the paper's: 50 epochs)" if grouped_epoch > 0
            else "not measured: the grouped run was not slower with more epochs (noise)"),
    ]
