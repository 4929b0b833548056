"""The release-parity check for a lent GPU, in one call: the golden fixture's test scripts and the
two recorded training runs on --device, with their differences from the CPU golden values printed.

The golden values were computed by the release on the CPU in fp32; on CUDA the release ran under
fp16 autocast, so differences of fp16 rounding are expected (this prints them; it asserts nothing).
Each test script runs twice: with the release's CUDA dtypes (--scoring_dtypes release, the default)
and with fp32 scoring.

From the repository root, with the fixture copied into the ignored folder .gl/ and the packages the
device image lacks in .whl/ (see docs/performance.md):
    cp -r ../shared/golden .gl/
    device run: command "bash scripts/gpu_golden.sh", carry [".gl", ".whl"], timeout_s 400
On the CPU (the suite runs it this way): python scripts/gpu_golden.py --device cpu --golden ../shared/golden/tiny
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mvfa import cli  # noqa: E402 - after the repository is on the path

TEST_RUNS = [("few-shot", "Brain", True), ("few-shot", "Histopathology", False), ("zero-shot", "Liver", True),
             ("zero-shot", "Chest", False)]
TRAIN_RUNS = [("few", "Brain"), ("zero", "Liver")]


def common_flags(golden: Path, device: str) -> list[str]:
    return ["--data_path", str(golden / "data"), "--model_name", str(golden / "config.json"),
            "--clip_ckpt", str(golden / "clip_jit.pt"), "--img_size", "84", "--features_list", "2", "4", "6", "8",
            "--seed", "111", "--device", device, "--cache_dir", "none"]


def run_quietly(main, argv: list[str]) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def read_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def check_test_script(golden: Path, device: str, mode: str, obj: str, has_masks: bool, dtypes: str, out: Path) -> dict:
    expected = json.loads((golden / "expected.json").read_text())["runs"][f"{mode}/{obj}"]
    argv = [*common_flags(golden, device), "--obj", obj, "--save_path", str(golden / "ckpt" / mode),
            "--output_dir", str(out), "--scoring_dtypes", dtypes]
    if mode == "few-shot":
        argv += ["--shot", "4", "--iterate", "0", "--fewshot_seed_dir", str(golden / "fewshot_seed")]
    main = cli.main_test_few if mode == "few-shot" else cli.main_test_zero
    if has_masks:
        argv += ["--save_maps"]
    code, printed = run_quietly(main, argv)
    if code != 0:
        return {"error": printed.strip().splitlines()[-1:]}
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    ours, reference = read_scores(out / "predictions.csv"), read_scores(golden / f"expected_{mode}_{obj}_image_scores.csv")
    row = {
        "image_auroc_diff": abs(metrics["image_auroc"] - expected["image_AUROC"]),
        "image_score_max_diff": max(abs(ours[p] - reference[p]) for p in reference),
    }
    if has_masks:
        row["pixel_auroc_diff"] = abs(metrics["pixel_auroc"] - expected["pixel_AUROC"])
    return row


def check_training(golden: Path, device: str, kind: str, obj: str, out: Path) -> dict:
    record_dir = golden / "replay" / kind
    record = json.loads((record_dir / "record.json").read_text())
    argv = [*common_flags(golden, device), "--obj", obj, "--epoch", "2", "--threshold_rule", "none",
            "--save_path", str(out / "ckpt"), "--output_dir", str(out / "out")]
    if kind == "few":
        argv += ["--shot", "4", "--iterate", "0", "--fewshot_seed_dir", str(golden / "fewshot_seed")]
        main, order = cli.main_train_few, ("pixel", "image")
    else:
        argv += ["--listings", str(record_dir / "listings.json")]
        main, order = cli.main_train_zero, ("image", "pixel")
    code, printed = run_quietly(main, argv)
    if code != 0:
        return {"error": printed.strip().splitlines()[-1:]}
    with open(out / "out" / "train_log.csv", newline="") as handle:
        ours = [float(row[f"test_{m}_auroc"]) for row in csv.DictReader(handle) for m in order]
    training = json.loads((out / "out" / "metrics.json").read_text())["training"]
    recorded = record["aucs_in_computation_order"]
    return {
        "evaluations": len(ours), "recorded": len(recorded),
        "auroc_max_diff": float(np.max(np.abs(np.subtract(ours, recorded)))) if len(ours) == len(recorded) else None,
        "epoch_loss_max_rel_diff": float(np.max(np.abs(np.subtract(training["epoch_losses"], record["epoch_mean_losses"]))
                                                / np.abs(record["epoch_mean_losses"]))),
        "selected": [training["best_epoch"], training["best_step"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default=str(REPO / ".gl" / "golden" / "tiny"), help="the golden fixture folder")
    parser.add_argument("--device", default="cuda", help="cuda (the point of the script) or cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these checks: test-script runs as mode/obj (e.g. few-shot/Brain), "
                             "training replays as few or zero (default: all)")
    args = parser.parse_args(argv)
    golden = Path(args.golden)
    if not (golden / "expected.json").is_file():
        print(f"error: no golden fixture at {golden}: copy ../shared/golden into .gl/ (see this script's docstring)")
        return 2
    results: dict = {"device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, obj, has_masks in TEST_RUNS:
            if args.only is not None and f"{mode}/{obj}" not in args.only:
                continue
            for dtypes in ("release", "fp32"):
                started = time.time()
                row = check_test_script(golden, args.device, mode, obj, has_masks, dtypes, Path(tmp) / f"{mode}-{obj}-{dtypes}")
                row["seconds"] = round(time.time() - started, 1)
                results[f"test {mode} {obj} --scoring_dtypes {dtypes}"] = row
                print(f"test {mode} {obj} ({dtypes} dtypes): {json.dumps(row)}", flush=True)
        for kind, obj in TRAIN_RUNS:
            if args.only is not None and kind not in args.only:
                continue
            started = time.time()
            row = check_training(golden, args.device, kind, obj, Path(tmp) / f"train-{kind}")
            row["seconds"] = round(time.time() - started, 1)
            results[f"train {kind} {obj}"] = row
            print(f"train {kind} {obj} (replay of the release's record): {json.dumps(row)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
