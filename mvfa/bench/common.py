"""What every section uses: the run's Context (the model, built once; temporary files), timing
helpers and random inputs."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import BenchConfig
from .library import CLIP, AdaptedViT, TensorSet, create_model, generate_benchmark


class SkipSection(Exception):
    """A section that cannot run in this configuration (the reason goes in the table)."""


class Context:
    """A run's shared state: its configuration, the model (built on first use) and a temporary folder."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self._clip: CLIP | None = None
        self._model: AdaptedViT | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mvfa-bench-")
        self.tmp = Path(self._tmp.name)
        self._brain: Path | None = None

    def close(self) -> None:
        self._tmp.cleanup()

    @property
    def clip_model(self) -> CLIP:
        if self._clip is None:
            torch.manual_seed(0)
            self._clip = create_model(self.cfg.model_name, self.cfg.img_size, device=self.device)
        return self._clip

    @property
    def model(self) -> AdaptedViT:
        if self._model is None:
            self._model = AdaptedViT(self.clip_model, list(self.cfg.stages)).to(self.device).eval()
        return self._model

    def text_features(self) -> torch.Tensor:
        """Random unit text features [embed, 2] (the cost of scoring does not depend on their values)."""
        generator = torch.Generator().manual_seed(1)
        embed = self.model.embed_dim
        return F.normalize(torch.randn(embed, 2, generator=generator), dim=0).to(self.device)

    def brain_data(self) -> Path:
        """A synthetic Brain_AD at the model's input size: 4-shot valid images and the test images."""
        if self._brain is None:
            shot, tests = self.cfg.process_shot, self.cfg.process_test_images
            self._brain = self.tmp / "data"
            generate_benchmark(self._brain, seed=0, image_size=self.cfg.img_size, n_valid=(shot, shot),
                               n_test=(tests // 2, tests - tests // 2), datasets=["Brain"])
        return self._brain


# ------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_of(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return min(seconds(fn, device) for _ in range(max(1, repeats)))


def timed_value(fn, device: torch.device, repeats: int):
    """(best seconds over `repeats` calls, the last call's value); no warm-up."""
    best, value = float("inf"), None
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        value = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, value


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# Random inputs


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def random_test_set(count: int, size: int, seed: int = 0) -> TensorSet:
    """Random uint8 images; the second half abnormal with a square lesion mask (both classes present)."""
    images = random_images(count, size, seed)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    labels = torch.zeros(count, dtype=torch.long)
    abnormal = range(count // 2, count)
    labels[count // 2 :] = 1
    for i in abnormal:
        top = (7 * i) % (size // 2)
        masks[i, top : top + size // 4, top : top + size // 4] = True
    return TensorSet(images, masks, labels, [f"image{i:05d}.png" for i in range(count)])


def train_inputs(ctx: Context):
    """One abnormal training image with a square mask: (images, masks, labels, has_masks) at batch 1."""
    size = ctx.cfg.img_size
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, size, size, generator=generator).to(ctx.device)
    masks = torch.zeros(1, 1, size, size)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return images, masks.to(ctx.device), torch.ones(1, device=ctx.device), torch.tensor([True], device=ctx.device)
