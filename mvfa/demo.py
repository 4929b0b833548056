"""python -m mvfa.demo: the whole method on CPU in minutes, on synthetic data and a tiny random CLIP.

It generates the synthetic benchmark (if absent), trains and tests few-shot (k = 4) and zero-shot
(leave-one-out) adapters for every dataset, prints the results in the paper's table layout next to
the paper's numbers, and writes anomaly-map overlays. A random tiny backbone demonstrates the
pipeline, not the paper's accuracy: for that, OpenAI's ViT-L/14@336px weights and the BMAD data
are needed (README).

It closes with complete commands (test_few, train_few, train_zero, test_zero, mvfa.predict) that run
as printed on its outputs: the tiny model's flags, its CLIP file, its checkpoints, and
`--fewshot_seed_dir <output_dir>/fewshot_seed`, where the demo writes the support lists it drew
(seed-file format). The demo's runs read the same lists, so a printed test_few reproduces the demo's
few-shot numbers; and the scripts' default seed folder (dataset/fewshot_seed: the paper's lists of
real BMAD file names) is never searched for synthetic data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import shlex
import sys

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("demo")

import numpy as np
import torch

from CLIP import create_model
from CLIP.config import CKPT_DIR, load_config
from dataset.medical import load_image, open_dataset, select_support, write_seed_file
from dataset.synthetic import SYNTHETIC_DATASETS, generate_benchmark

from mvfa.paper import PAPER_AUC, PAPER_ROWS, format_cell, paper_mean, row_names
from mvfa.parsers import demo_parser
from mvfa.runs.config import RunConfig
from mvfa.runs.run import RunResult, run
from mvfa.runs.visualize import overlay, save_png
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import save_torch_atomic, write_text_atomic
from mvfa.runtime.process import USER_ERRORS, default_device

TINY_MODEL = "ViT-Tiny-14"
PAPER_MODEL = "ViT-L-14-336"
# Table columns: (our mode, metric) and the paper's column it sits beside.
COLUMNS = (
    (("zero-shot", "det"), ("zero-shot", "det")),
    (("zero-shot", "loc"), ("zero-shot", "loc")),
    (("few-shot", "det"), ("4-shot", "det")),
    (("few-shot", "loc"), ("4-shot", "loc")),
)
DISCLAIMER = (
    "This demo trains on synthetic images with a tiny CLIP of random weights: it shows the whole\n"
    "pipeline working (data, adapters, training, scoring, metrics, overlays), not the paper's accuracy."
)


@dataclass
class DemoSettings:
    output_dir: Path
    datasets: tuple[str, ...]
    seed: int = 0
    synthetic_size: int = 64  # pixels of the generated images
    img_size: int = 112  # model input (ViT-Tiny-14: an 8 x 8 patch grid)
    features_list: tuple[int, ...] = (2, 4, 6, 8)
    shot: int = 4
    few_epochs: int = 5
    zero_epochs: int = 2
    learning_rate: float = 1e-3
    n_valid: tuple[int, int] = (12, 12)
    n_test: tuple[int, int] = (16, 16)
    overlays: int = 3  # per dataset with masks: the highest-scoring abnormal images and the top normal one
    device: str = "cpu"


def parse_args(argv: list[str] | None) -> DemoSettings:
    parser = demo_parser()
    args = parser.parse_args(argv)
    settings = DemoSettings(
        output_dir=Path(args.output_dir), datasets=tuple(args.datasets), seed=args.seed,
        few_epochs=args.few_epochs, zero_epochs=args.zero_epochs,
        device=args.device or default_device(),
    )
    if args.quick:
        settings.n_valid, settings.n_test = (5, 5), (4, 4)
        settings.img_size, settings.shot = 56, 2
        settings.few_epochs, settings.zero_epochs = min(settings.few_epochs, 1), min(settings.zero_epochs, 1)
    return settings


def tiny_clip_checkpoint(settings: DemoSettings) -> Path:
    """A seeded random ViT-Tiny-14, written once as a plain state dict."""
    path = settings.output_dir / f"tiny-clip-seed{settings.seed}.pt"
    if not path.is_file():
        torch.manual_seed(settings.seed)
        state = create_model(TINY_MODEL).state_dict()
        save_torch_atomic(state, path)
    return path


SUPPORT_ITERATE = 0  # the line of the demo's support lists (and the scripts' default --iterate)


def seed_dir(settings: DemoSettings) -> Path:
    """Where the demo writes its support lists, <obj>/<k>-shot.txt: its runs and its printed commands read them."""
    return settings.output_dir / "fewshot_seed"


def write_support_list(settings: DemoSettings, obj: str) -> Path:
    """Draw the few-shot support of `obj` (deterministic from the demo's seed) and record it as a seed file.

    Never reads dataset/fewshot_seed (the paper's lists of real BMAD names, absent from synthetic data).
    """
    dataset = open_dataset(settings.output_dir / "data", obj)
    support = select_support(dataset, settings.shot, SUPPORT_ITERATE, settings.seed, [])
    path = seed_dir(settings) / obj / f"{settings.shot}-shot.txt"
    write_seed_file(path, support, SUPPORT_ITERATE)
    return path


def run_config(settings: DemoSettings, mode: str, obj: str, clip_ckpt: Path) -> RunConfig:
    few = mode == "few-shot"
    root = settings.output_dir
    return RunConfig(
        mode=mode,
        train=True,
        obj=obj,
        data_path=root / "data",
        save_path=root / "ckpt" / mode,
        output_dir=root / "results" / mode / obj,
        model_name=TINY_MODEL,
        clip_ckpt=clip_ckpt,
        img_size=settings.img_size,
        features_list=settings.features_list,
        shot=settings.shot,
        iterate=SUPPORT_ITERATE,
        seed=settings.seed,
        epoch=settings.few_epochs if few else settings.zero_epochs,
        learning_rate=settings.learning_rate,
        select="last",
        fewshot_seed_dirs=(seed_dir(settings),),
        device=settings.device,
        eval_batch_size=16,
    )


def write_overlays(result: RunResult, settings: DemoSettings, mode: str, obj: str) -> list[Path]:
    """Overlays of the top-scoring abnormal images and the top-scoring normal image (datasets with masks)."""
    evaluation = result.evaluation
    if evaluation.maps is None:
        return []
    scores, labels = evaluation.image_scores, evaluation.labels
    abnormal = [i for i in np.argsort(-scores) if labels[i] == 1][: max(1, settings.overlays - 1)]
    normal = [i for i in np.argsort(-scores) if labels[i] == 0][:1]
    low, high = float(evaluation.maps.min()), float(evaluation.maps.max())
    written = []
    for index in [*abnormal, *normal]:
        path = Path(evaluation.paths[index])
        image = load_image(path, settings.img_size)
        picture = overlay(image, evaluation.maps[index], evaluation.masks[index], (low, high))
        kind = "abnormal" if labels[index] else "normal"
        name = f"{mode}_{obj}_{kind}_{path.stem}_score{scores[index]:.3f}.png"
        written.append(save_png(picture, settings.output_dir / "overlays" / name))
    return written


def average_label(sets: dict[str, list[str]]) -> str:
    """'average of ChestXray, BrainMRI (zero-shot loc: BrainMRI)': the datasets each column averages over."""
    columns = list(sets)
    first = sets[columns[0]]
    label = f"average of {row_names(first) or 'none'}"
    others = [f"{column}: {row_names(sets[column]) or 'none'}" for column in columns[1:] if sets[column] != first]
    return label + (f" ({'; '.join(others)})" if others else "")


def results_table(results: dict[tuple[str, str], dict[str, float]], datasets: tuple[str, ...], shot: int) -> str:
    """Markdown table in the paper's layout: per cell 'paper / demo' (AUC %; the paper's few-shot is 4-shot).

    The average row averages each column over the datasets the demo has values for, and the paper's
    value beside it is the paper's mean over those same datasets (not its six-dataset average).
    """
    names = {"zero-shot": "zero-shot", "few-shot": f"{shot}-shot"}
    header = "| AUC (%) paper / demo | " + " | ".join(f"{names[m]} {metric}" for (m, metric), _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for obj, row in PAPER_ROWS.items():
        if obj not in datasets:
            continue
        cells = [f"{format_cell(PAPER_AUC[paper].get(obj))} / {format_cell(results[ours].get(obj))}" for ours, paper in COLUMNS]
        lines.append(f"| {row} ({obj}) | " + " | ".join(cells) + " |")
    averages, sets = [], {}
    for ours, paper in COLUMNS:
        over = [obj for obj in PAPER_ROWS if obj in results[ours]]
        values = [results[ours][obj] for obj in over]
        sets[f"{names[ours[0]]} {ours[1]}"] = over
        averages.append(f"{format_cell(paper_mean(paper, over))} / {format_cell(float(np.mean(values)) if values else None)}")
    lines.append(f"| {average_label(sets)} | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def real_backbone_hint() -> str:
    weights = CKPT_DIR / load_config(PAPER_MODEL).openai_file
    if weights.is_file():
        return (
            f"OpenAI's checkpoint is present ({weights}). With the BMAD data under ./data, the paper's\n"
            "4-shot Brain run is:  python train_few.py --obj Brain --shot 4 && python test_few.py --obj Brain --shot 4"
        )
    return f"For the paper's backbone, put OpenAI's ViT-L-14-336px.pt at {weights} (see README)."


def next_commands(settings: DemoSettings, clip_ckpt: Path, checkpoints: dict[tuple[str, str], Path]) -> list[list[str]]:
    """Commands that go on with the demo's model and data, as argument lists (first: the program).

    One dataset (the first with masks, so maps and contours show): test_few on the demo's few-shot
    checkpoint (the demo's numbers again), train_few and train_zero as the demo trained (outputs under
    <output_dir>/next), test_zero on the demo's zero-shot checkpoint, and mvfa.predict on its test
    images. Every few-shot command names the demo's support lists (--fewshot_seed_dir).
    """
    with_masks = [d.name for d in SYNTHETIC_DATASETS if d.has_masks and d.name in settings.datasets]
    obj = (with_masks or list(settings.datasets))[0]
    root, data = settings.output_dir, settings.output_dir / "data"
    later = root / "next"
    model = ["--data_path", str(data), "--model_name", TINY_MODEL, "--clip_ckpt", str(clip_ckpt),
             "--img_size", str(settings.img_size), "--features_list", *map(str, settings.features_list),
             "--seed", str(settings.seed), "--device", settings.device]
    few = ["--shot", str(settings.shot), "--iterate", str(SUPPORT_ITERATE), "--fewshot_seed_dir", str(seed_dir(settings))]
    commands = []
    few_ckpt = checkpoints.get(("few-shot", obj))
    if few_ckpt is not None:
        commands.append(["python", "test_few.py", "--obj", obj, *model, *few, "--checkpoint", str(few_ckpt),
                         "--output_dir", str(later / "test_few" / obj)])
    commands.append(["python", "train_few.py", "--obj", obj, *model, *few, "--epoch", str(settings.few_epochs),
                     "--learning_rate", str(settings.learning_rate), "--select", "last",
                     "--save_path", str(later / "ckpt" / "few-shot"), "--output_dir", str(later / "train_few" / obj)])
    zero_ckpt = checkpoints.get(("zero-shot", obj))
    if zero_ckpt is not None:
        commands.append(["python", "train_zero.py", "--obj", obj, *model, "--epoch", str(settings.zero_epochs),
                         "--learning_rate", str(settings.learning_rate), "--select", "last",
                         "--save_path", str(later / "ckpt" / "zero-shot"), "--output_dir", str(later / "train_zero" / obj)])
        commands.append(["python", "test_zero.py", "--obj", obj, *model, "--checkpoint", str(zero_ckpt),
                         "--output_dir", str(later / "test_zero" / obj)])
    if few_ckpt is not None:
        split = data / f"{obj}_AD"
        predict = ["python", "-m", "mvfa.predict", "--ckpt", str(few_ckpt), "--clip_ckpt", str(clip_ckpt),
                   "--input", str(split / "test" / "Ungood" / "img"), "--support", str(split / "valid" / "good" / "img"),
                   "--output_dir", str(later / "predict" / obj), "--device", settings.device]
        if obj in with_masks:
            predict[-2:-2] = ["--masks", str(split / "test" / "Ungood" / "anomaly_mask")]
        commands.append(predict)
    return commands


def next_steps_text(settings: DemoSettings, clip_ckpt: Path, checkpoints: dict[tuple[str, str], Path]) -> str:
    """The closing lines: how to go on with the demo's model (commands indented by two spaces)."""
    lines = [
        f"Go on with the demo's model (tiny random CLIP, {TINY_MODEL}; run from this folder, new outputs go to "
        f"{settings.output_dir / 'next'}):",
        *("  " + " ".join(shlex.quote(word) for word in command) for command in next_commands(settings, clip_ckpt, checkpoints)),
        f"Few-shot commands read the demo's support lists in {seed_dir(settings)} (--fewshot_seed_dir): the scripts' "
        "default lists name the paper's BMAD files, which synthetic data does not have.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    print(DISCLAIMER)
    try:
        counts = generate_benchmark(
            settings.output_dir / "data", seed=settings.seed, image_size=settings.synthetic_size,
            n_valid=settings.n_valid, n_test=settings.n_test, datasets=settings.datasets,
        )
        made = [name for name, info in counts.items() if info["written"]]
        print(f"synthetic benchmark in {settings.output_dir / 'data'}" + (f" (generated {', '.join(made)})" if made else ""))
        clip_ckpt = tiny_clip_checkpoint(settings)
        for obj in settings.datasets:
            write_support_list(settings, obj)
        results: dict[tuple[str, str], dict[str, float]] = {ours: {} for ours, _ in COLUMNS}
        overlays: list[Path] = []
        checkpoints: dict[tuple[str, str], Path] = {}
        for mode in ("few-shot", "zero-shot"):
            if mode == "zero-shot" and len(settings.datasets) < 2:
                print("zero-shot needs at least two datasets (leave-one-out): skipped")
                continue
            for obj in settings.datasets:
                print(f"\n== {mode} {obj} ==", flush=True)
                result = run(run_config(settings, mode, obj, clip_ckpt))
                if result.checkpoint is not None:
                    checkpoints[(mode, obj)] = result.checkpoint
                results[(mode, "det")][obj] = 100 * result.metrics["image_auroc"]
                if "pixel_auroc" in result.metrics:
                    results[(mode, "loc")][obj] = 100 * result.metrics["pixel_auroc"]
                overlays += write_overlays(result, settings, mode, obj)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = results_table(results, settings.datasets, settings.shot)
    write_text_atomic(settings.output_dir / "results.md", f"{DISCLAIMER}\n\n{table}\n")
    print(f"\n{table}\n")
    print(f"{len(overlays)} overlays in {settings.output_dir / 'overlays'}; table in {settings.output_dir / 'results.md'}")
    print(DISCLAIMER)
    print(next_steps_text(settings, clip_ckpt, checkpoints))
    print(real_backbone_hint())
    return 0


if __name__ == "__main__":
    sys.exit(main())
