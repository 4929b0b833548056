"""python -m mvfa.demo: the whole method on CPU in minutes, on synthetic data and a tiny random CLIP.

It generates the synthetic benchmark (if absent), trains and tests few-shot (k = 4) and zero-shot
(leave-one-out) adapters for every dataset, prints the results in the paper's table layout next to
the paper's numbers, and writes anomaly-map overlays. A random tiny backbone demonstrates the
pipeline, not the paper's accuracy: for that, OpenAI's ViT-L/14@336px weights and the BMAD data
are needed (README).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("demo")

import numpy as np
import torch

from CLIP import create_model
from CLIP.config import CKPT_DIR, load_config
from CLIP.errors import CLIPError
from dataset.errors import DatasetError
from dataset.medical import load_image
from dataset.synthetic import generate_benchmark

from .engine import RunConfig, RunResult, run, write_atomic
from .errors import MVFAError
from .paper import PAPER_AUC, PAPER_AVERAGE, PAPER_ROWS, format_cell
from .parsers import demo_parser
from .visualize import overlay, save_png

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
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
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
        iterate=0,
        seed=settings.seed,
        epoch=settings.few_epochs if few else settings.zero_epochs,
        learning_rate=settings.learning_rate,
        select="last",
        fewshot_seed_dirs=(),
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


def results_table(results: dict[tuple[str, str], dict[str, float]], datasets: tuple[str, ...], shot: int) -> str:
    """Markdown table in the paper's layout: per cell 'paper / demo' (AUC %; the paper's few-shot is 4-shot)."""
    names = {"zero-shot": "zero-shot", "few-shot": f"{shot}-shot"}
    header = "| AUC (%) paper / demo | " + " | ".join(f"{names[m]} {metric}" for (m, metric), _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for obj, row in PAPER_ROWS.items():
        if obj not in datasets:
            continue
        cells = [f"{format_cell(PAPER_AUC[paper].get(obj))} / {format_cell(results[ours].get(obj))}" for ours, paper in COLUMNS]
        lines.append(f"| {row} ({obj}) | " + " | ".join(cells) + " |")
    averages = []
    for ours, paper in COLUMNS:
        values = list(results[ours].values())
        averages.append(f"{format_cell(PAPER_AVERAGE[paper])} / {format_cell(float(np.mean(values)) if values else None)}")
    lines.append("| average | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def real_backbone_hint() -> str:
    weights = CKPT_DIR / load_config(PAPER_MODEL).openai_file
    if weights.is_file():
        return (
            f"OpenAI's checkpoint is present ({weights}). With the BMAD data under ./data, the paper's\n"
            "4-shot Brain run is:  python train_few.py --obj Brain --shot 4 && python test_few.py --obj Brain --shot 4"
        )
    return f"For the paper's backbone, put OpenAI's ViT-L-14-336px.pt at {weights} (see README)."


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
        results: dict[tuple[str, str], dict[str, float]] = {ours: {} for ours, _ in COLUMNS}
        overlays: list[Path] = []
        for mode in ("few-shot", "zero-shot"):
            if mode == "zero-shot" and len(settings.datasets) < 2:
                print("zero-shot needs at least two datasets (leave-one-out): skipped")
                continue
            for obj in settings.datasets:
                print(f"\n== {mode} {obj} ==", flush=True)
                result = run(run_config(settings, mode, obj, clip_ckpt))
                results[(mode, "det")][obj] = 100 * result.metrics["image_auroc"]
                if "pixel_auroc" in result.metrics:
                    results[(mode, "loc")][obj] = 100 * result.metrics["pixel_auroc"]
                overlays += write_overlays(result, settings, mode, obj)
    except (CLIPError, DatasetError, MVFAError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = results_table(results, settings.datasets, settings.shot)
    write_atomic(settings.output_dir / "results.md", f"{DISCLAIMER}\n\n{table}\n")
    print(f"\n{table}\n")
    print(f"{len(overlays)} overlays in {settings.output_dir / 'overlays'}; table in {settings.output_dir / 'results.md'}")
    print(DISCLAIMER)
    print(real_backbone_hint())
    return 0


if __name__ == "__main__":
    sys.exit(main())
