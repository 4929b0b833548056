"""Shared pieces of the end-to-end script tests: a tiny random CLIP and small synthetic data."""
from __future__ import annotations

from pathlib import Path

import torch

from CLIP import create_model

TINY_MODEL = "ViT-Tiny-14"
TINY_SIZE = 56  # 4 x 4 patches: the fastest size that still has a patch grid
TINY_STAGES = ["2", "4", "6", "8"]
NO_SEED_LISTS = "no-seed-lists"  # a folder name that holds no support lists
# conftest.py's shared synthetic benchmark (fixture synthetic_data): all six datasets
SYNTHETIC_SEED, SYNTHETIC_SIZE = 1, 64
SYNTHETIC_N_VALID, SYNTHETIC_N_TEST = (6, 6), (5, 5)


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A seeded random ViT-Tiny-14 saved as a plain state dict."""
    torch.manual_seed(seed)
    torch.save(create_model(TINY_MODEL).state_dict(), path)
    return path


def tiny_argv(data_path: Path, clip_ckpt: Path, save_path: Path, output_dir: Path, obj: str, *extra: str) -> list[str]:
    """A script's flags on the tiny CLIP and synthetic data. Few-shot runs (those given --shot) read
    support lists from a folder without any, so that the support is drawn from --seed: the lists
    shipped in dataset/fewshot_seed name BMAD files that synthetic data does not have."""
    seed_lists = []
    if "--shot" in extra and "--fewshot_seed_dir" not in extra:
        seed_lists = ["--fewshot_seed_dir", str(Path(data_path) / NO_SEED_LISTS)]
    return [
        "--obj", obj,
        "--data_path", str(data_path),
        "--model_name", TINY_MODEL,
        "--clip_ckpt", str(clip_ckpt),
        "--img_size", str(TINY_SIZE),
        "--features_list", *TINY_STAGES,
        "--save_path", str(save_path),
        "--output_dir", str(output_dir),
        "--device", "cpu",
        *seed_lists,
        *extra,
    ]
