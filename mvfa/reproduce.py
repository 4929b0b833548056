"""python -m mvfa.reproduce: the paper's tables in one command, under the release's protocol and a leak-free one.

For every benchmark dataset under --data_path (HIS, ChestXray, OCT17, BrainMRI, LiverCT, RESC) it runs
zero-shot (leave-one-out) and k-shot (each --shots k, over --splits support splits; optionally the
normal-only k-shot mode) under two protocols:

- release: model selection on test labels (--select test) and min-max over the test set (--normalize test),
  as the release produced the paper's tables;
- leakfree: selection on valid data (--select valid) and normalisation statistics fitted on valid normal
  images (--normalize valid): no test label is read before the final evaluation, and each test image
  is scored on its own.

Each run writes <output_dir>/runs/<dataset>/<setting>/<protocol>/split<i>/ (metrics.json last: a run
with it is finished and skipped when the command is run again). results.csv (one row per finished
run) and results.md (the paper's layout: paper / release mean±std / leak-free mean±std (n=test
images)) are rewritten atomically from every finished run after each run.

results.md names what the numbers were made with (backbone, CLIP weights, epochs, data, shots and
splits, protocols), read from the runs' own metrics.json, and its title says "the paper's settings"
only when every run used them (mvfa.paper.PAPER_SETTINGS: ViT-L-14-336, OpenAI's weights file by its
sha256, 240 px, stages 6 12 18 24, 50 epochs, batch 1, the release's learning rates and loss) on all
six datasets; otherwise it lists the differences. The average row averages each column over the
datasets that have runs in it, names them, and sets the paper's mean over the same datasets beside it.

Before a run, <run_dir>/data.json records a fingerprint of the data it reads (few-shot: the target
dataset; zero-shot: every dataset under --data_path, the sources included): per dataset, the sha256
of its files' sorted relative paths and contents (hidden files skipped). Contents, not sizes and
mtimes: one read of the data per invocation (sha256 runs at several hundred MB/s, seconds beside
trainings of hours), and it holds when the data is copied elsewhere (new mtimes) and catches an edit
that keeps a file's size. A finished run whose data changed is refused with one line, as one made
with other settings is; a finished run without data.json (made before it existed) is reused with a note.

In one process the runs train together (README, "Reproducing the tables in one command"): the two
protocols of a run share one training trajectory (--one_by_one: each alone), and up to --group_size
runs of one setting (the zero-shot targets; the k-shot splits of every dataset) train in lockstep
as one batched computation.

Under `torchrun --nproc_per_node N` the runs go side by side, one per rank (each on its own GPU,
cuda:LOCAL_RANK, single-process inside): rank r takes runs r, r + N, ... First every run but the
normal-only ones, then (after all ranks are done, since they read the zero-shot runs' checkpoints)
the normal-only ones; rank 0 then writes the table of all rows. Only rank 0 prints.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, replace
import hashlib
import io
import json
from pathlib import Path
import sys

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("reproduce")

import numpy as np

from CLIP.config import CKPT_DIR, load_config
from CLIP.loading import sha256_of
from dataset.medical import find_datasets, select_support

from mvfa.choices import DEFAULT_SEED_DIR
from mvfa.paper import (
    PAPER_AUC,
    PAPER_LEARNING_RATES,
    PAPER_ROWS,
    PAPER_SETTINGS,
    format_cell,
    paper_mean,
    row_names,
)
from mvfa.parsers import reproduce_parser
from mvfa.runs.config import TRAINING_ONLY, TRAINING_SETTINGS, RunConfig
from mvfa.runs.outputs import json_ready
from mvfa.runs.run import run_grouped
from mvfa.runtime.distributed import CPU_BACKEND, SINGLE, Dist, barrier, gather_objects, quiet_unless_main
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import write_text_atomic
from mvfa.runtime.process import guarded, resolve_cache_dir, resolve_device, resolve_precision

PROTOCOLS = {"release": ("test", "test"), "leakfree": ("valid", "valid")}  # protocol -> (select, normalize)
METRICS = {"det": "image_auroc", "loc": "pixel_auroc"}
# Under torchrun a rank waits at the end for the others' runs (trainings of hours): no short timeout.
RANKS_WAIT_S = 7 * 24 * 3600.0
# Settings whose training/selection must match for a finished run to be reused.
FINGERPRINT = ("model_name", "clip_ckpt", "pretrain", "img_size", "features_list", "epoch", "learning_rate", "seed",
               "batch_size", "det_loss", "quick_gelu", "precision", "select", "normalize", "shot", "iterate", "only_normal")
CSV_FIELDS = (
    "dataset", "paper_row", "setting", "shot", "only_normal", "split", "protocol", "select", "normalize", "support",
    "image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "pixel_aupro", "n_images", "n_normal", "n_abnormal",
    "seconds", "run_dir", "data_sha256",
)
DATA_FILE = "data.json"  # a run's data fingerprint, written before the run
DATA_METHOD = "sha256 of each dataset's sorted relative file paths and file contents (hidden files skipped)"
HASH_CHUNK = 1 << 20
SHORT_HASH = 12  # hex digits shown in results.md
UNVERIFIED = "maybe OpenAI's weights"  # marks the one difference that may not be one (see report_title)


@dataclass(frozen=True)
class Plan:
    """One run: a dataset, a setting (zero-shot, k-shot, k-shot normal-only), a split and a protocol."""

    dataset: str
    mode: str  # "zero-shot" or "few-shot"
    shot: int  # 0 for zero-shot
    only_normal: bool
    split: int
    protocol: str

    @property
    def setting(self) -> str:
        if self.mode == "zero-shot":
            return "zero-shot"
        return f"{self.shot}-shot" + ("-normal" if self.only_normal else "")

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / self.dataset / self.setting / self.protocol / f"split{self.split}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = reproduce_parser()
    args = parser.parse_args(argv)
    if args.splits < 1 or args.group_size < 1 or any(k < 1 for k in args.shots):
        parser.error("--splits, --group_size and every --shots value must be >= 1")
    return args


def base_config(args: argparse.Namespace, device: str | None = None) -> RunConfig:
    """Settings shared by every run; `device` (a torchrun rank's own) overrides --device."""
    device = resolve_device(device if device is not None else args.device)
    return RunConfig(
        mode="few-shot", train=True, obj="", data_path=Path(args.data_path), save_path=Path("."), output_dir=Path("."),
        model_name=args.model_name, clip_ckpt=Path(args.clip_ckpt) if args.clip_ckpt else None, pretrain=args.pretrain,
        img_size=args.img_size, features_list=tuple(args.features_list), seed=args.seed, epoch=args.epoch,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, device=str(device),
        precision=resolve_precision(args.precision, device), num_workers=args.num_workers,
        quick_gelu=args.quick_gelu, det_loss=args.det_loss, prefix_cache=args.prefix_cache,
        cache_dir=resolve_cache_dir(args.cache_dir), cuda_graph=args.cuda_graph,
    )


def plan_runs(datasets: list[str], args: argparse.Namespace) -> list[Plan]:
    """Per dataset: zero-shot (one run per protocol; it has no support), then per k the splits, then normal-only."""
    plans = []
    for name in datasets:
        zero = len(datasets) > 1
        if zero:
            plans += [Plan(name, "zero-shot", 0, False, 0, p) for p in args.protocols]
        for shot in args.shots:
            plans += [Plan(name, "few-shot", shot, False, s, p) for s in range(args.splits) for p in args.protocols]
            if args.only_normal and zero:
                plans += [Plan(name, "few-shot", shot, True, s, p) for s in range(args.splits) for p in args.protocols]
    return plans


def config_for(plan: Plan, base: RunConfig, args: argparse.Namespace, root: Path) -> RunConfig:
    select, normalize = PROTOCOLS[plan.protocol]
    folder = plan.run_dir(root)
    few = plan.mode == "few-shot"
    seed_dirs = tuple(Path(p) for p in (args.fewshot_seed_dir or [DEFAULT_SEED_DIR]))
    config = replace(
        base, mode=plan.mode, train=not plan.only_normal, obj=plan.dataset, save_path=folder, output_dir=folder,
        shot=plan.shot if few else 4, iterate=plan.split if few else 0,
        learning_rate=args.few_learning_rate if few else args.zero_learning_rate,
        select=select, normalize=normalize, only_normal=plan.only_normal,
        cuda_graph=base.cuda_graph and not plan.only_normal,  # normal-only runs train nothing
        fewshot_seed_dirs=seed_dirs if plan.split == 0 else (),  # later splits: deterministic draws
    )
    if plan.only_normal:
        zero = Plan(plan.dataset, "zero-shot", 0, False, 0, plan.protocol)
        config.checkpoint = zero.run_dir(root) / replace(config, mode="zero-shot").checkpoint_name()
    return config


def fingerprint(config: dict) -> dict:
    return {k: config.get(k) for k in FINGERPRINT}


def hash_dataset(root: Path) -> str:
    """sha256 over a dataset folder: each non-hidden file's relative path and contents, in sorted path order."""
    digest = hashlib.sha256()
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for path in files:
        relative = path.relative_to(root).as_posix().encode()
        digest.update(len(relative).to_bytes(8, "little") + relative)
        contents = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                contents.update(chunk)
        digest.update(contents.digest())
    return digest.hexdigest()


class DataFingerprints:
    """Each dataset's hash, computed once per invocation (the data must not change while reproduce runs)."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = Path(data_path)
        self.hashes: dict[str, str] = {}

    def of(self, names: list[str]) -> dict[str, str]:
        present = find_datasets(self.data_path)
        for name in names:
            if name not in self.hashes:
                self.hashes[name] = hash_dataset(present[name].root)
        return {name: self.hashes[name] for name in names}

    def for_plan(self, plan: Plan) -> dict[str, str]:
        """The datasets a run reads: few-shot its target; zero-shot every dataset under --data_path (the sources)."""
        names = sorted(find_datasets(self.data_path)) if plan.mode == "zero-shot" else [plan.dataset]
        return self.of(names)


def combined_hash(datasets: dict[str, str]) -> str:
    """One sha256 for a run's datasets (name: hash pairs in name order)."""
    return hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(datasets.items())).encode()).hexdigest()


def write_data_file(plan: Plan, root: Path, data: DataFingerprints) -> None:
    payload = {"data_path": str(data.data_path), "method": DATA_METHOD, "datasets": data.for_plan(plan)}
    write_text_atomic(plan.run_dir(root) / DATA_FILE, json.dumps(payload, indent=2) + "\n")


def check_finished(plan: Plan, config: RunConfig, root: Path, data: DataFingerprints | None = None) -> bool:
    """True when the run has results made with the same settings on the same data; an error when not."""
    path = plan.run_dir(root) / "metrics.json"
    if not path.is_file():
        return False
    stored = fingerprint({"only_normal": False, **json.loads(path.read_text()).get("config", {})})
    wanted = fingerprint(json.loads(json.dumps(json_ready(config))))  # as stored: tuples become lists
    # a test run (--only_normal) trains nothing: its training settings are its checkpoint's, a run of its own
    keys = FINGERPRINT if config.train else [k for k in FINGERPRINT if k not in TRAINING_ONLY]
    differ = [k for k in keys if stored[k] != wanted[k]]
    if differ:
        raise MVFAError(
            f"{path} was made with other settings ({', '.join(f'{k} {stored[k]} vs {wanted[k]}' for k in differ)}): "
            "use another --output_dir or delete that run"
        )
    if data is None:
        return True
    data_file = plan.run_dir(root) / DATA_FILE
    if not data_file.is_file():
        print(f"note: {plan.run_dir(root)} has no {DATA_FILE} (made before data fingerprints): reused, its data unchecked")
        return True
    was = json.loads(data_file.read_text()).get("datasets", {})
    now = data.for_plan(plan)
    changed = sorted(name for name in set(was) | set(now) if was.get(name) != now.get(name))
    if changed:
        what = ", ".join(f"{name}_AD {'added' if name not in was else 'removed' if name not in now else 'changed'}"
                         for name in changed)
        raise MVFAError(
            f"{plan.run_dir(root)} was made on other data ({what} under {data.data_path} since that run): "
            "use another --output_dir or delete that run"
        )
    return True


# ------------------------------------------------------------------------------------------------
# Collecting finished runs


def support_of(payload: dict, data_path: Path) -> str:
    """Where a run's support came from (seed file line or deterministic draw), from its stored settings."""
    config = payload.get("config", {})
    if payload.get("mode") != "few-shot":
        return "none (zero-shot)"
    try:
        dataset = find_datasets(data_path)[payload["obj"]]
        support = select_support(dataset, config["shot"], config["iterate"], config["seed"],
                                 [Path(p) for p in config.get("fewshot_seed_dirs", [])])
    except Exception as err:  # noqa: BLE001 - provenance only; never fail the table for it
        return f"unknown ({err})"
    kinds = "normal only" if config.get("only_normal") else "abnormal + normal"
    return f"{support.source}; {kinds}"


def collect(root: Path, data_path: Path) -> list[dict]:
    """One row per finished run under <root>/runs, in the paper's dataset order."""
    rows = []
    for path in sorted((root / "runs").glob("*/*/*/split*/metrics.json")):
        split_dir = path.parent
        protocol, setting, dataset = split_dir.parent.name, split_dir.parent.parent.name, split_dir.parent.parent.parent.name
        if dataset not in PAPER_ROWS or protocol not in PROTOCOLS:
            continue
        payload = json.loads(path.read_text())
        metrics, config = payload["metrics"], payload.get("config", {})
        only_normal = bool(config.get("only_normal", False))
        row = {
            "dataset": dataset, "paper_row": PAPER_ROWS[dataset], "setting": setting,
            "shot": config.get("shot") if payload.get("mode") == "few-shot" else 0, "only_normal": int(only_normal),
            "split": int(split_dir.name[len("split"):]), "protocol": protocol,
            "select": "none (zero-shot adapters)" if only_normal else config.get("select"),
            "normalize": config.get("normalize"), "support": support_of(payload, data_path),
            "run_dir": split_dir.relative_to(root).as_posix(), "data_sha256": stored_data_hash(split_dir),
        }
        for key in CSV_FIELDS:
            if key not in row:
                row[key] = metrics.get(key, "")
        rows.append(row)
    order = list(PAPER_ROWS)
    protocols = list(PROTOCOLS)
    rows.sort(key=lambda r: (order.index(r["dataset"]), r["shot"], r["only_normal"], protocols.index(r["protocol"]), r["split"]))
    return rows


def stored_data_hash(run_dir: Path) -> str:
    """The combined hash of a run's data.json ('' for a run made before fingerprints)."""
    path = run_dir / DATA_FILE
    return combined_hash(json.loads(path.read_text())["datasets"]) if path.is_file() else ""


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The table


def stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single run) of AUCs in %."""
    array = 100 * np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def format_stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = stats(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def column_values(rows: list[dict], setting: str, metric: str, protocol: str) -> dict[str, dict[int, float]]:
    """dataset -> split -> AUC (fraction) of the finished runs of one column and protocol."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["setting"] == setting and row["protocol"] == protocol and row[METRICS[metric]] != "":
            out.setdefault(row["dataset"], {})[row["split"]] = float(row[METRICS[metric]])
    return out


def average_values(per_dataset: dict[str, dict[int, float]]) -> list[float]:
    """Per split, the mean over datasets (splits every dataset of the column has); the average row's values."""
    if not per_dataset:
        return []
    common = sorted(set.intersection(*(set(v) for v in per_dataset.values())))
    return [float(np.mean([v[s] for v in per_dataset.values()])) for s in common]


def paper_value(setting: str, metric: str, dataset: str) -> float | None:
    key = ("zero-shot" if setting == "zero-shot" else setting, metric)
    return PAPER_AUC.get(key, {}).get(dataset)


def results_table(rows: list[dict], datasets: list[str]) -> str:
    """Markdown: per cell 'paper / release mean±std / leak-free mean±std (n=test images)', AUC %."""
    settings = ["zero-shot"] + sorted({r["setting"] for r in rows if r["setting"] != "zero-shot"},
                                      key=lambda s: (int(s.split("-")[0]), s.endswith("normal")))
    columns = [(s, m) for s in settings for m in METRICS]
    n_images = {r["dataset"]: int(r["n_images"]) for r in rows if r["n_images"] != ""}
    header = "| AUC (%): paper / release / leak-free | " + " | ".join(
        f"{s.replace('-normal', ' normal-only')} {m}" for s, m in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    values = {(c, p): column_values(rows, *c, p) for c in columns for p in PROTOCOLS}
    for name in [d for d in PAPER_ROWS if d in datasets]:
        cells = []
        for column in columns:
            ours = [values[(column, p)].get(name, {}) for p in PROTOCOLS]
            if not any(ours) and paper_value(*column, name) is None:
                cells.append("-")
                continue
            parts = [format_cell(paper_value(*column, name))] + [format_stats(list(v.values())) for v in ours]
            cells.append(" / ".join(parts) + (f" (n={n_images[name]})" if name in n_images and any(ours) else ""))
        lines.append(f"| {PAPER_ROWS[name]} | " + " | ".join(cells) + " |")
    averages = []
    for column in columns:
        over = [d for d in PAPER_ROWS if any(d in values[(column, p)] for p in PROTOCOLS)]
        if not over:  # no run yet: the paper's mean over the datasets of the table that it reports
            over = [d for d in PAPER_ROWS if d in datasets and paper_value(*column, d) is not None]
        if not over:
            averages.append("-")
            continue
        # a protocol missing one of the datasets has no average (it would be over other datasets)
        ours = [average_values(values[(column, p)]) if set(values[(column, p)]) == set(over) else [] for p in PROTOCOLS]
        setting = "zero-shot" if column[0] == "zero-shot" else column[0]
        cell = " / ".join([format_cell(paper_mean((setting, column[1]), over))] + [format_stats(v) for v in ours])
        n = f"n={sum(n_images[d] for d in over)}; " if all(d in n_images for d in over) else ""
        averages.append(f"{cell} ({n}over {row_names(over)})")
    lines.append("| average | " + " | ".join(averages) + " |")
    return "\n".join(lines)


_WEIGHTS_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, hashed once per invocation


def weights_identity(config: dict) -> tuple[str, bool]:
    """(what the CLIP weights were, True when they are OpenAI's published file of the paper's model by sha256)."""
    if config.get("pretrain") == "none":
        return "random (--pretrain none)", False
    name = config.get("model_name")
    try:
        model = load_config(name)
    except Exception:  # noqa: BLE001 - an unregistered JSON config: no published file to compare with
        model = None
    path = Path(config["clip_ckpt"]) if config.get("clip_ckpt") else (
        CKPT_DIR / model.openai_file if model is not None and model.openai_file else None)
    if path is None:
        return "unknown (no --clip_ckpt recorded)", False
    if not path.is_file():
        return f"{path} (no longer there: not checked)", False
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHTS_SHA256:
        _WEIGHTS_SHA256[key] = sha256_of(path)
    digest = _WEIGHTS_SHA256[key]
    if model is not None and model.openai_sha256 and digest == model.openai_sha256:
        return f"{path} (OpenAI's {model.openai_file}, sha256 checked)", True
    return f"{path} (sha256 {digest[:SHORT_HASH]}…; not OpenAI's published file)", False


def _values(configs: list[dict], key: str) -> list:
    """The distinct values of a setting over the runs, in first-seen order."""
    seen = []
    for config in configs:
        value = config.get(key)
        if value not in seen:
            seen.append(value)
    return seen


def _shown(values: list) -> str:
    return ", ".join(" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in values)


def run_configs(root: Path, rows: list[dict]) -> list[dict]:
    """Each finished run's stored settings, with its mode and (under "_data") its data fingerprints."""
    configs = []
    for row in rows:
        payload = json.loads((root / row["run_dir"] / "metrics.json").read_text())
        data_file = root / row["run_dir"] / DATA_FILE
        data = json.loads(data_file.read_text()).get("datasets", {}) if data_file.is_file() else {}
        trained_with = {k: v for k, v in payload.get("training", {}).items() if k in TRAINING_SETTINGS}  # a test run's checkpoint
        configs.append({**payload.get("config", {}), **trained_with, "mode": payload.get("mode"), "_data": data})
    return configs


def settings_report(rows: list[dict], configs: list[dict], datasets: list[str], args: argparse.Namespace) -> tuple[str, list[str]]:
    """(markdown list of what the runs were made with, the differences from the paper's settings)."""
    if not configs:  # nothing finished yet: what this invocation asked for
        configs = [{**vars(args), "mode": "few-shot", "learning_rate": args.few_learning_rate,
                    "features_list": list(args.features_list), "data_path": args.data_path}]
    differ = []
    for key, want in PAPER_SETTINGS.items():
        found = _values(configs, key)
        if found != [want]:
            differ.append(f"{key} {_shown(found)} (paper: {_shown([want])})")
    for mode, want in PAPER_LEARNING_RATES.items():
        found = _values([c for c in configs if c.get("mode") == mode and not c.get("only_normal")], "learning_rate")
        if found and found != [want]:
            differ.append(f"{mode} learning rate {_shown(found)} (paper: {want})")
    if any(c.get("quick_gelu") for c in configs):
        differ.append("QuickGELU (the release ran exact GELU)")
    weights = {}
    for config in configs:
        key = (config.get("model_name"), config.get("clip_ckpt"), config.get("pretrain"))
        if key not in weights:
            weights[key] = weights_identity(config)
    if not all(ok for _, ok in weights.values()):
        unverifiable = all(c.get("pretrain") != "none" and c.get("model_name") == PAPER_SETTINGS["model_name"] for c in configs)
        differ.append("CLIP weights not OpenAI's published file by sha256"
                      + (f" ({UNVERIFIED}: a converted copy has another sha256)" if unverifiable else ""))
    missing = [d for d in PAPER_ROWS if d not in datasets]
    if missing:
        differ.append(f"datasets {row_names(datasets)} only ({row_names(missing)} absent)")

    n_images = {}
    for row in rows:
        if row["n_images"] != "":
            n_images.setdefault(row["dataset"], row["n_images"])
    hashes: dict[str, list[str]] = {}
    for config in configs:
        for name, digest in config.get("_data", {}).items():
            if digest[:SHORT_HASH] not in hashes.setdefault(name, []):
                hashes[name].append(digest[:SHORT_HASH])
    protocols = sorted({r["protocol"] for r in rows}, key=list(PROTOCOLS).index) or list(args.protocols)
    shots = sorted({int(r["shot"]) for r in rows if r["setting"] != "zero-shot"}) or list(args.shots)
    splits = max((int(r["split"]) + 1 for r in rows if r["setting"] != "zero-shot"), default=args.splits)
    lines = [
        f"- backbone: {_shown(_values(configs, 'model_name'))}, input {_shown(_values(configs, 'img_size'))} px, "
        f"adapter stages {_shown(_values(configs, 'features_list'))}",
        "- CLIP weights: " + "; ".join(text for text, _ in weights.values()),
        f"- training: epochs {_shown(_values(configs, 'epoch'))}, batch {_shown(_values(configs, 'batch_size'))}, "
        f"learning rate {_shown(_values([c for c in configs if c.get('mode') == 'few-shot' and not c.get('only_normal')], 'learning_rate')) or '-'} "
        f"(k-shot) / {_shown(_values([c for c in configs if c.get('mode') == 'zero-shot'], 'learning_rate')) or '-'} "
        f"(zero-shot), det loss {_shown(_values(configs, 'det_loss'))}, seed {_shown(_values(configs, 'seed'))}, "
        f"precision {_shown(_values(configs, 'precision'))}",
        f"- data: {_shown(_values(configs, 'data_path'))}: "
        + ", ".join(f"{PAPER_ROWS[d]} ({n_images[d]} test images)" if d in n_images else PAPER_ROWS[d] for d in datasets)
        + (f"; fingerprints ({DATA_METHOD}): " + ", ".join(f"{n} {'/'.join(h)}" for n, h in sorted(hashes.items()))
           if hashes else ""),
        f"- k-shot: k = {', '.join(map(str, shots))}, {splits} support splits per k; zero-shot: leave-one-out, one run per protocol",
        "- protocols: " + ", ".join(f"{p} (--select {PROTOCOLS[p][0]} --normalize {PROTOCOLS[p][1]})" for p in protocols),
    ]
    return "\n".join(lines), differ


def report_title(differ: list[str]) -> str:
    """'the paper's settings' only when nothing differs; an unchecked weights file alone says 'not verified'."""
    if not differ:
        return "# MVFA results (the paper's settings)"
    only_weights = len(differ) == 1 and UNVERIFIED in differ[0]
    if only_weights:
        return f"# MVFA results (not verified as the paper's settings: {differ[0]})"
    return f"# MVFA results (NOT the paper's settings: {'; '.join(differ)})"


def report(rows: list[dict], datasets: list[str], args: argparse.Namespace, configs: list[dict] | None = None) -> str:
    runs = {(r["setting"], r["protocol"]): 0 for r in rows}
    for r in rows:
        runs[(r["setting"], r["protocol"])] += 1
    counts = ", ".join(f"{s} {p}: {n}" for (s, p), n in sorted(runs.items()))
    settings, differ = settings_report(rows, configs or [], datasets, args)
    return (
        f"{report_title(differ)}\n\n"
        f"Made with (read from the runs' metrics.json):\n\n{settings}\n\n"
        "Each cell: the paper's AUC (%) / ours under the release's protocol (selection on test labels, min-max over "
        "the test set) / ours leak-free (selection on valid data, normalisation fitted on valid normal images), as "
        f"mean±std (sample std) over support splits; (n=…) is the number of test images. k-shot uses k normal and k "
        f"abnormal labelled valid images per split (split 0: the release's seed file where present, then "
        f"deterministic draws); normal-only k-shot uses the k normal images as memory bank with the zero-shot "
        f"adapters and no abnormal image. Zero-shot has no support and one run per protocol. "
        f"The paper reports 4-shot only ('-' elsewhere). The average row: per column, the mean over the datasets "
        f"named in the cell (those with runs in that column), beside the paper's mean over the same datasets (its "
        f"published average covers all six, or the three with masks for loc); its std is over the splits every "
        f"dataset has, and a protocol without runs on all of those datasets shows '-'.\n\n"
        f"{results_table(rows, datasets)}\n\n"
        f"Finished runs: {counts or 'none'}. One row per run in results.csv.\n"
    )


def write_results(root: Path, data_path: Path, datasets: list[str], args: argparse.Namespace) -> list[dict]:
    rows = collect(root, data_path)
    write_text_atomic(root / "results.csv", rows_csv(rows))
    write_text_atomic(root / "results.md", report(rows, datasets, args, run_configs(root, rows)))
    return rows


def run_groups(plans: list[Plan], together: bool, group_size: int) -> list[list[list[tuple[int, Plan]]]]:
    """(1-based index, plan) in sets trained together, the sets in groups trained in lockstep.

    A set: the protocols of one dataset, setting and split share a training trajectory (normal-only
    runs train nothing: one by one); `together` False: every plan alone. A group: up to `group_size`
    sets of one setting (the zero-shot targets; the k-shot splits of every dataset for one k), trained
    in lockstep as one batched computation, in the order the sets are planned. A group runs where its
    first set is planned, so every zero-shot run is made before the normal-only runs that read its
    checkpoint.
    """
    sets: dict[tuple, list[tuple[int, Plan]]] = {}
    for index, plan in enumerate(plans, start=1):
        key = (plan.dataset, plan.setting, plan.split) if together and not plan.only_normal else (index,)
        sets.setdefault(key, []).append((index, plan))
    groups: list[list[list[tuple[int, Plan]]]] = []
    filling: dict[str, list[list[tuple[int, Plan]]]] = {}  # per setting, the group that takes its next set
    for runs in sets.values():
        plan = runs[0][1]
        if not together or plan.only_normal:
            groups.append([runs])
            continue
        group = filling.get(plan.setting)
        if group is None or len(group) >= group_size:
            group = filling[plan.setting] = []
            groups.append(group)
        group.append(runs)
    return groups


def rank_phases(groups: list, dist: Dist) -> list[list]:
    """This rank's groups of runs, per phase; the ranks meet between phases.

    One process: one phase, every group in order. Several ranks: the normal-only runs read the
    zero-shot runs' checkpoints, which another rank may be making, so they form a second phase;
    within a phase rank r takes the groups r, r + N, ...
    """
    if not dist.active:
        return [groups]
    phases = [[g for g in groups if not g[0][0][1].only_normal], [g for g in groups if g[0][0][1].only_normal]]
    return [phase[dist.rank :: dist.world_size] for phase in phases]


def reproduce(args: argparse.Namespace, dist: Dist = SINGLE, device: str | None = None) -> None:
    """Every planned run of this rank, then (rank 0) the table; see the module docstring."""
    root = Path(args.output_dir)
    present = find_datasets(args.data_path)
    datasets = [d for d in PAPER_ROWS if d in present and (args.datasets is None or d in args.datasets)]
    if not datasets:
        raise MVFAError(
            f"{args.data_path} holds none of the benchmark datasets ({', '.join(f'{d}_AD' for d in PAPER_ROWS)})"
        )
    with quiet_unless_main(dist):
        if len(datasets) < 2:
            print("note: zero-shot (and normal-only) runs need at least two datasets (leave-one-out): skipped")
        base = base_config(args, device)
        if base.cuda_graph and not base.device.startswith("cuda"):
            raise MVFAError(f"--cuda_graph replays the training step from CUDA graphs: it needs --device cuda "
                            f"(this run: {base.device}); remove --cuda_graph")
        plans = plan_runs(datasets, args)
        data = DataFingerprints(Path(args.data_path))
        if dist.active:
            print(f"{dist.world_size} ranks make the runs side by side, one run per rank at a time; shown: rank 0's runs")
        done = 0
        group_size = 1 if dist.active else args.group_size  # under torchrun each rank trains its own runs
        for phase in rank_phases(run_groups(plans, not args.one_by_one, group_size), dist):
            for group in phase:
                todo = []
                for runs in group:
                    pending = []
                    for index, plan in runs:
                        config = config_for(plan, base, args, root)
                        what = f"[{index}/{len(plans)}] {plan.dataset} {plan.setting} {plan.protocol} split {plan.split}"
                        if check_finished(plan, config, root, data):
                            print(f"{what}: finished before, skipped", flush=True)
                        else:
                            pending.append((what, plan, config))
                    if pending:
                        todo.append(pending)
                if not todo:
                    continue
                shown = [f"== {what} ==" for pending in todo for what, _, _ in pending]
                if len(todo) > 1:
                    what = "targets" if todo[0][0][1].mode == "zero-shot" else "splits"
                    shown.append(f"(trained together: {len(todo)} {what} in lockstep, the protocols of each sharing one trajectory)")
                elif len(todo[0]) > 1:
                    shown.append("(trained together: one trajectory, each protocol's selection)")
                print("\n" + "\n".join(shown), flush=True)
                for pending in todo:
                    for _, plan, _ in pending:
                        write_data_file(plan, root, data)
                run_grouped([[config for _, _, config in pending] for pending in todo])
                done += sum(len(pending) for pending in todo)
                if dist.is_main:
                    write_results(root, Path(args.data_path), datasets, args)
            barrier(dist)
        made = gather_objects(done, dist)
        if not dist.is_main:
            return
        rows = write_results(root, Path(args.data_path), datasets, args)
        print(f"\n{results_table(rows, datasets)}\n")
        print(f"{sum(made)} runs made, {len(plans) - sum(made)} reused; {root / 'results.csv'} and {root / 'results.md'} written")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda dist, device: reproduce(args, dist, device), args.device, RANKS_WAIT_S, CPU_BACKEND)


if __name__ == "__main__":
    sys.exit(main())
