"""Speed and memory benchmark of the toolkit: one table, one JSON file.

    python -m mvfa.bench                         # every section, default sizes, on CUDA when present
    python -m mvfa.bench --smoke                 # ViT-Tiny-14 and a few images: seconds
    python -m mvfa.bench --only forward,auroc --json bench.json
    python -m mvfa.bench --device cuda --full_protocol --json bench.json

The default model is the real ViT-L-14-336 architecture at 240 px with RANDOM weights (speed and
memory do not depend on the weights' values). Every figure is measured in one run; where a target is
a ratio (machines are noisy, shared CPUs more so) both sides of the ratio are measured side by side.

Sections (``--only``, comma separated):

forward     FLOPs per image (analytic, checked with torch's FlopCounterMode); CPU: FLOP/s of the
            adapted ViT at the best batch size against a large fp32 matrix product; CUDA: images/s
            with autocast fp16 and bf16 over batch sizes, and an 8192^3 bf16 matrix product.
train_step  mvfa.training.train_step at batch 1 (both losses, a mask) against an emulation of the
            release's step (every CLIP weight requires grad, the whole forward under autograd).
protocol    per-image costs of the few-shot protocol's parts through the real code paths
            (the engine's training loop, build_memory_bank, evaluate), extrapolated to the release's
            4-shot Brain protocol and to the zero-shot protocol.
auroc       mvfa.metrics.pixel_auroc against sklearn's roc_auc_score (mvfa.bench_metrics).
memory      peak memory of evaluate beyond the fused maps; peak of a memory-bank search vs Q x B.
startup     text features of the 420 prompts: all 77 positions (the release) vs the trimmed context
            the model uses, and the on-disk cache when mvfa.text has one.
process     test_few.py as a whole process on CPU (wall time, peak RSS) against a release
            emulation of the same work, both as subprocesses.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("bench")

import numpy as np
import torch
import torch.nn.functional as F

from CLIP import create_model, tokenize
from CLIP.config import load_config
from CLIP.model import CLIP, resample_positional_embedding

from . import bench_metrics, engine, scoring
from . import text as text_module
from .augment import AUGMENTATIONS, augment
from .evaluation import TensorSet, autocast_for, bank_branch, build_memory_bank, evaluate
from .evaluation import prefix_bytes as evaluation_prefix_bytes
from .model import ADAPTER_MIX, STREAM_KEEP, AdaptedViT
from .parsers import bench_parser as build_parser
from .prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, state_sentences
from .replay import ReleaseRandom
from .training import ZERO_SHOT_EVALS_PER_EPOCH, Selector, after_epoch, compute_loss, few_shot_batches, make_optimizers, train_loop, train_step

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("forward", "train_step", "protocol", "auroc", "memory", "startup", "process")

# The release's protocols (METHOD.md sections 5 and 6): the sizes the extrapolations use.
EPOCHS = 50
FEW_SHOT_TRAIN_IMAGES = 88  # 4-shot: (4 abnormal + 4 normal) x 11 augmentations
FEW_SHOT_BANK_IMAGES = 44  # the augmented normal images
BRAIN_TEST_IMAGES = 3715
ZERO_SHOT_TRAIN_IMAGES = 8000  # about the sum of the five source datasets' test splits
ZERO_SHOT_TEST_IMAGES = 1493
ZERO_SHOT_EVALS = EPOCHS * ZERO_SHOT_EVALS_PER_EPOCH

# Targets of the issue.
TARGET_FORWARD_VS_MATMUL = 0.85  # CPU: forward FLOP/s / fp32 matmul FLOP/s
TARGET_IMAGES_PER_S = 1500.0  # CUDA: forward images/s at the best batch size
TARGET_TRAIN_SPEEDUP = 2.0
TARGET_FEW_SHOT_MIN = 10.0  # on an H100
TARGET_ZERO_SHOT_MIN = 60.0  # on an H100
TARGET_AUROC_DIFF = 1e-9
TARGET_AUROC_MEMORY = 2.0  # peak extra memory / the scores' size
TARGET_PROCESS_SPEEDUP = 2.0
TARGET_PROCESS_MEMORY = 0.5
RELEASE_ON_THIS_CPU = "the real release took ~200 s and 4.5 GB on the project's 2-core CPU (issue)"


# ------------------------------------------------------------------------------------------------
# Rows, configuration, device


@dataclass
class Row:
    """One figure of the table. `target` reads like ">= 2"; `ok` is None where there is no target."""

    figure: str
    value: float | int | str | None
    unit: str = ""
    target: str | None = None
    ok: bool | None = None
    section: str = ""
    note: str = ""


_COMPARE = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def checked(figure: str, value: float, unit: str, op: str, bound: float, note: str = "") -> Row:
    """A row with a target `value op bound` and its verdict."""
    ok = None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(_COMPARE[op](value, bound))
    return Row(figure, value, unit, f"{op} {bound:g}", ok, note=note)


@dataclass
class BenchConfig:
    """Sizes of every section; `for_device` fills the defaults of a CPU, a CUDA or a smoke run."""

    device: str = "cpu"
    smoke: bool = False
    model_name: str = "ViT-L-14-336"
    img_size: int = 240
    stages: tuple[int, ...] = (6, 12, 18, 24)
    precision: str = "fp32"  # the training/evaluation precision (the CLI's default per device)
    eval_batch_size: int = 8  # the CLI's default
    forward_batches: tuple[int, ...] = (1, 4, 8)  # CPU; 8 is the scripts' evaluation batch
    forward_precisions: tuple[str, ...] = ("fp32",)
    forward_repeats: int = 2
    forward_min_seconds: float = 0.0  # CUDA: time each batch size for at least this long
    matmul_size: int = 4096
    matmul_repeats: int = 5
    train_rounds: int = 2
    protocol_train_images: int = 8
    protocol_bank_images: int = 8
    protocol_test_images: int = 16
    auroc_n: int = 200_000_000
    sklearn_budget_s: float = 600.0
    # evaluate's memory at two test-set sizes, both over one batch (from the second batch on, the
    # previous batch's tokens are alive during a forward: a one-off step, not a per-image cost), and
    # far enough apart that the maps (230 KB per image at 240 px) show above the noise of RSS
    memory_images: tuple[int, int] = (16, 64)
    bank_tokens: int = 100_000
    startup_repeats: int = 1
    process_shot: int = 4
    process_test_images: int = 12
    threads: int | None = None  # torch (and children's OpenMP) threads; None: torch's default

    @classmethod
    def for_device(cls, device: str, smoke: bool, full_protocol: bool) -> "BenchConfig":
        eval_batch = engine.RunConfig.__dataclass_fields__["eval_batch_size"].default
        if smoke:
            return cls(
                device=device, smoke=True, model_name="ViT-Tiny-14", img_size=56, stages=(2, 4, 6, 8),
                precision="fp16" if device.startswith("cuda") else "fp32", eval_batch_size=eval_batch,
                forward_batches=(1, 2), forward_precisions=("fp16", "bf16") if device.startswith("cuda") else ("fp32",),
                forward_repeats=1, matmul_size=512, matmul_repeats=2, train_rounds=1, protocol_train_images=3,
                protocol_bank_images=4, protocol_test_images=6, auroc_n=200_000, sklearn_budget_s=30.0,
                memory_images=(9, 17), bank_tokens=20_000, startup_repeats=1, process_test_images=4,
                threads=1,  # tiny tensors: thread barriers would cost more than they save
            )
        if device.startswith("cuda"):
            return cls(
                device=device, precision="fp16", eval_batch_size=eval_batch,
                forward_batches=(1, 8, 32, 64, 128, 256), forward_precisions=("fp16", "bf16"),
                forward_repeats=3, forward_min_seconds=1.0, matmul_size=8192, matmul_repeats=10,
                train_rounds=10, protocol_train_images=FEW_SHOT_TRAIN_IMAGES,
                protocol_bank_images=FEW_SHOT_BANK_IMAGES,
                protocol_test_images=BRAIN_TEST_IMAGES if full_protocol else 512,
                memory_images=(256, 1024), bank_tokens=1_000_000, startup_repeats=3,
            )
        return cls(
            device=device, eval_batch_size=eval_batch,
            protocol_test_images=BRAIN_TEST_IMAGES if full_protocol else 16,
            protocol_train_images=FEW_SHOT_TRAIN_IMAGES if full_protocol else 8,
            protocol_bank_images=FEW_SHOT_BANK_IMAGES if full_protocol else 8,
        )


def cpu_name() -> str:
    return bench_metrics._cpu_name()


def device_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------------
# Shared state of a run: the model (built once), temporary files, timing helpers


class SkipSection(Exception):
    """A section that cannot run in this configuration (the reason goes in the table)."""


class Context:
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
            from dataset.synthetic import generate_benchmark

            shot, tests = self.cfg.process_shot, self.cfg.process_test_images
            self._brain = self.tmp / "data"
            generate_benchmark(self._brain, seed=0, image_size=self.cfg.img_size, n_valid=(shot, shot),
                               n_test=(tests // 2, tests - tests // 2), datasets=["Brain"])
        return self._brain


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


# ------------------------------------------------------------------------------------------------
# 1. forward


def adapted_vit_flops(width: int, patch: int, image_size: int, embed_dim: int, stages, mlp_ratio: float = 4.0) -> dict:
    """FLOPs (2 per multiply-add) of one image through the adapted ViT, up to the last stage.

    Per block, with N tokens of width w (hidden 4w):
        q, k, v and out projections 4 N w^2, MLP 2 N w (4w) = 8 N w^2: 12 N w^2 multiply-adds
        -> 24 N w^2 FLOPs; attention scores Q K^T and the weighted sum A V: 2 N^2 w multiply-adds
        -> 4 N^2 w FLOPs.
    Patch convolution: grid^2 patches x w outputs x (3 patch^2) inputs, x 2.
    Adapters: per stage a seg and a det adapter, each w -> embed -> w: 2 x 2 N w embed multiply-adds,
        -> 8 N w embed FLOPs per stage.
    Layer norms, activations, softmax and the residual sums are not counted (a few per cent of a
    per cent; they are memory-bound). The class-token pooling (ln_post, proj) is not run.
    """
    grid = image_size // patch
    tokens = grid * grid + 1
    hidden = int(width * mlp_ratio)
    blocks = max(stages)
    linear = 2 * tokens * (4 * width * width + 2 * width * hidden)
    attention = 4 * tokens * tokens * width
    conv = 2 * grid * grid * width * 3 * patch * patch
    adapters = len(stages) * 8 * tokens * width * embed_dim
    total = blocks * (linear + attention) + conv + adapters
    return {"tokens": tokens, "blocks": blocks, "block_linear": linear, "block_attention": attention,
            "blocks_total": blocks * (linear + attention), "patch_conv": conv, "adapters": adapters, "total": total}


def model_flops(ctx: Context) -> dict:
    visual = ctx.model.visual
    return adapted_vit_flops(visual.conv1.out_channels, visual.patch_size, ctx.cfg.img_size, visual.proj.shape[1],
                             ctx.cfg.stages, visual.transformer.resblocks[0].mlp.c_fc.out_features / visual.conv1.out_channels)


def counted_flops(ctx: Context) -> tuple[int, bool]:
    """torch.utils.flop_counter's count of one forward at batch 1, and whether it saw the attention."""
    from torch.utils import flop_counter

    images = torch.rand(1, 3, ctx.cfg.img_size, ctx.cfg.img_size, device=ctx.device)
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
        ctx.model(images)
    names = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    return int(counter.get_total_flops()), any("attention" in name for name in names)


def matmul_flops_per_s(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = best_of(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / best


def forward_rate(ctx: Context, batch: int, precision: str) -> float:
    """Images per second of the adapted ViT's forward (no_grad, as evaluation runs it)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=device)

    def step() -> None:
        with torch.no_grad(), autocast_for(device, precision):
            model(images)

    if cfg.forward_min_seconds <= 0:
        return batch / best_of(step, device, cfg.forward_repeats)
    for _ in range(2):
        step()
    sync(device)
    count, start = 0, time.perf_counter()
    while count < cfg.forward_repeats or time.perf_counter() - start < cfg.forward_min_seconds:
        step()
        count += 1
        if count % 4 == 0:
            sync(device)
    sync(device)
    return batch * count / (time.perf_counter() - start)


def section_forward(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    flops = model_flops(ctx)
    per_image = flops["total"]
    rows = [
        Row("GFLOP per image, analytic", per_image / 1e9, "GFLOP",
            note=f"N={flops['tokens']} tokens, {flops['blocks']} blocks x (24Nw^2 + 4N^2w = "
                 f"{(flops['block_linear'] + flops['block_attention']) / 1e9:.3f}) + patch conv "
                 f"{flops['patch_conv'] / 1e9:.3f} + {2 * len(cfg.stages)} adapters {flops['adapters'] / 1e9:.3f}"),
        Row("GFLOP per image, blocks only", flops["blocks_total"] / 1e9, "GFLOP",
            note="the issue's ~184 GFLOP is this figure (the transformer blocks alone)"),
    ]
    counted, saw_attention = counted_flops(ctx)
    rows.append(Row("GFLOP per image, torch FlopCounterMode", counted / 1e9, "GFLOP",
                    note="includes attention" if saw_attention else
                    f"attention (SDPA) not counted on this device; + analytic attention = "
                    f"{(counted + flops['blocks'] * flops['block_attention']) / 1e9:.3f}"))
    if ctx.device.type == "cuda":
        best = (0.0, None, None)
        for precision in cfg.forward_precisions:
            for batch in cfg.forward_batches:
                rate = forward_rate(ctx, batch, precision)
                rows.append(Row(f"forward images/s, {precision}, batch {batch}", rate, "img/s"))
                if rate > best[0]:
                    best = (rate, precision, batch)
                torch.cuda.empty_cache()
        rows.append(checked("forward images/s, best", best[0], "img/s", ">=", TARGET_IMAGES_PER_S,
                            note=f"{best[1]}, batch {best[2]}"))
        matmul = matmul_flops_per_s(cfg.matmul_size, torch.bfloat16, ctx.device, cfg.matmul_repeats)
        achieved = best[0] * per_image
        rows.append(Row(f"bf16 matmul TFLOP/s ({cfg.matmul_size}^3 torch.mm)", matmul / 1e12, "TFLOP/s"))
        rows.append(Row("forward TFLOP/s at the best batch", achieved / 1e12, "TFLOP/s"))
        rows.append(Row("forward / bf16 matmul FLOP/s", achieved / matmul, "x", note="reference, no target"))
        return rows
    matmul_before = matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats)
    best = (0.0, None)
    for batch in cfg.forward_batches:
        rate = forward_rate(ctx, batch, "fp32") * per_image
        rows.append(Row(f"forward GFLOP/s, fp32, batch {batch}", rate / 1e9, "GFLOP/s"))
        best = max(best, (rate, batch), key=lambda t: t[0])
    matmul = max(matmul_before, matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats))
    rows.append(Row("forward GFLOP/s, best", best[0] / 1e9, "GFLOP/s", note=f"batch {best[1]}"))
    rows.append(Row(f"fp32 matmul GFLOP/s ({cfg.matmul_size}^3 torch.mm)", matmul / 1e9, "GFLOP/s",
                    note=f"best of {cfg.matmul_repeats} before and {cfg.matmul_repeats} after the forwards"))
    rows.append(checked("forward / matmul FLOP/s", best[0] / matmul, "x", ">=", TARGET_FORWARD_VS_MATMUL,
                        note=f"{torch.get_num_threads()} threads"))
    if torch.get_num_threads() > 1:
        single_forward, single_matmul = single_thread_rates(ctx, best[1], per_image)
        rows.append(Row("forward GFLOP/s, 1 thread", single_forward / 1e9, "GFLOP/s", note=f"batch {best[1]}"))
        rows.append(Row("fp32 matmul GFLOP/s, 1 thread", single_matmul / 1e9, "GFLOP/s"))
        rows.append(Row("forward / matmul FLOP/s, 1 thread", single_forward / single_matmul, "x",
                        note="the model's code without thread barriers: on a shared machine a descheduled thread "
                             "stalls every parallel operator of the forward, and much less a large matmul"))
    return rows


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def single_thread_rates(ctx: Context, batch: int, per_image: float) -> tuple[float, float]:
    """(forward FLOP/s, matmul FLOP/s) on one thread; the matmul is timed before and after the forward."""
    cfg = ctx.cfg
    with torch_threads(1):
        matmul = matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats)
        forward = forward_rate(ctx, batch, "fp32") * per_image
        matmul = max(matmul, matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats))
    return forward, matmul


# ------------------------------------------------------------------------------------------------
# 2. train_step


def release_train_step(model: AdaptedViT, optimizers, images, masks, labels, text_features, has_masks):
    """The release's step: the caller has set requires_grad on every CLIP weight; the whole forward,
    the frozen blocks before the first stage included, runs under autograd, and backward computes the
    backbone's weight gradients, which no optimiser uses (they accumulate, as in the release, whose
    optimisers zero only the adapters' gradients)."""
    optimizers.zero_grad()
    x = model.visual.embed(images)
    for block in model.visual.transformer.resblocks[: model.stages[0]]:
        x = block(x)
    parts = compute_loss(model, images, masks, labels, text_features, has_masks, prefix=x)
    parts.total.backward()
    optimizers.seg.step()
    optimizers.det.step()
    return parts


def _train_inputs(ctx: Context):
    size = ctx.cfg.img_size
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, size, size, generator=generator).to(ctx.device)
    masks = torch.zeros(1, 1, size, size)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return images, masks.to(ctx.device), torch.ones(1, device=ctx.device), torch.tensor([True], device=ctx.device)


def _engine_caches_prefix() -> bool:
    """Whether the engine's few-shot training feeds train_step cached prefixes of the support images."""
    return hasattr(engine, "cache_support_prefixes") and "support_prefixes" in {
        f.name for f in dataclasses.fields(engine.FewShotData)}


def section_train_step(ctx: Context) -> list[Row]:
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images, masks, labels, has_masks = _train_inputs(ctx)
    text_features = ctx.text_features()
    optimizers = make_optimizers(model, 1e-3)
    with torch.no_grad(), autocast_for(device, cfg.precision):
        prefix = model.encode_prefix(images)

    def ours() -> None:
        with autocast_for(device, cfg.precision):
            train_step(model, optimizers, images, masks, labels, text_features, has_masks)

    def ours_cached() -> None:
        with autocast_for(device, cfg.precision):
            train_step(model, optimizers, images, masks, labels, text_features, has_masks, prefix=prefix)

    def release() -> None:
        with autocast_for(device, cfg.precision):
            release_train_step(model, optimizers, images, masks, labels, text_features, has_masks)

    def release_mode(on: bool) -> None:
        """The release's requires_grad on every CLIP weight (its unused gradients stay, and accumulate)."""
        model.visual.requires_grad_(on)

    times = {"ours": [], "cached": [], "release": []}
    state = model.adapter_state()  # restored after: later sections measure fresh adapters
    try:
        for _ in range(1):  # warm-up of each (allocations, autocast caches, the backbone's grad buffers)
            ours()
            ours_cached()
            release_mode(True)
            release()
            release_mode(False)
        for _ in range(cfg.train_rounds):  # interleaved, so that a noisy moment hits all three alike
            times["ours"].append(seconds(ours, device))
            times["cached"].append(seconds(ours_cached, device))
            release_mode(True)
            times["release"].append(seconds(release, device))
            release_mode(False)
    finally:
        release_mode(False)
        for p in model.visual.parameters():
            p.grad = None
        model.load_adapter_state(state)
    median = {k: float(np.median(v)) for k, v in times.items()}
    engine_cached = _engine_caches_prefix()
    note = f"median of {cfg.train_rounds} interleaved steps, batch 1, {cfg.precision}"
    rows = [
        Row("train step s, release emulation (backbone weight grads)", median["release"], "s", note=note),
        Row("train step s, train_step from images", median["ours"], "s", note=note),
        Row("train step s, train_step from a cached prefix", median["cached"], "s", note=note),
    ]
    speed_images = median["release"] / median["ours"]
    speed_cached = median["release"] / median["cached"]
    if engine_cached:
        rows.append(Row("train step speed-up vs release, from images", speed_images, "x"))
        rows.append(checked("train step speed-up vs release, cached prefix", speed_cached, "x", ">=",
                            TARGET_TRAIN_SPEEDUP, note="the engine's training loop uses the prefix cache"))
    else:
        rows.append(checked("train step speed-up vs release, from images", speed_images, "x", ">=",
                            TARGET_TRAIN_SPEEDUP, note="the engine's training loop runs train_step from images"))
        rows.append(Row("train step speed-up vs release, cached prefix", speed_cached, "x",
                        note="not yet used by the engine's training loop"))
    return rows


# ------------------------------------------------------------------------------------------------
# 3. protocol


def _protocol_config(ctx: Context, epochs: int) -> engine.RunConfig:
    cfg = ctx.cfg
    return engine.RunConfig(mode="few-shot", train=True, obj="Brain", data_path=ctx.tmp, save_path=ctx.tmp,
                            output_dir=ctx.tmp, model_name=cfg.model_name, img_size=cfg.img_size,
                            features_list=tuple(cfg.stages), epoch=epochs, select="last", batch_size=1,
                            eval_batch_size=cfg.eval_batch_size, device=str(ctx.device), precision=cfg.precision)


def _few_shot_data(ctx: Context, train_count: int, bank_count: int) -> engine.FewShotData:
    """Random support images: half abnormal (with a mask), half normal; a separate set for the bank."""
    size = ctx.cfg.img_size
    support = random_images(train_count, size, seed=3).float() / 255
    masks = torch.zeros(train_count, 1, size, size)
    masks[: train_count // 2, :, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    labels = torch.cat([torch.ones(train_count // 2), torch.zeros(train_count - train_count // 2)])
    normal = random_images(bank_count, size, seed=4).float() / 255
    return engine.FewShotData(support_images=support, support_masks=masks, support_labels=labels,
                              normal_images=normal, support_samples=[])


def _time_training(ctx: Context, config: engine.RunConfig, few_shot: engine.FewShotData,
                   text_features: torch.Tensor) -> tuple[float, float]:
    """Two epochs of the engine's own training loop (training.train_loop) over the support at batch 1.

    Returns (seconds of the second epoch, seconds of the first beyond the second)."""
    batches = few_shot_batches(config, few_shot, text_features, True, ReleaseRandom(config.seed))
    stamps: list[float] = []

    def timed_batches(epoch: int):
        sync(ctx.device)
        stamps.append(time.perf_counter())
        return batches(epoch)

    selector = Selector(after_epoch, lambda: (None, {}))
    state = ctx.model.adapter_state()
    with contextlib.redirect_stdout(io.StringIO()):
        train_loop(config, ctx.model, timed_batches, selector, [], ctx.device)
    sync(ctx.device)
    stamps.append(time.perf_counter())
    ctx.model.load_adapter_state(state)
    first, second = stamps[1] - stamps[0], stamps[2] - stamps[1]
    return second, max(0.0, first - second)


def _time_decode(ctx: Context) -> float:
    """Seconds per image to decode and resize a synthetic PNG (the zero-shot loader does it each epoch)."""
    from dataset.medical import ImageSet, open_dataset

    samples = open_dataset(ctx.brain_data(), "Brain").samples("test")
    images = ImageSet(samples, ctx.cfg.img_size)
    start = time.perf_counter()
    for i in range(len(images)):
        images[i]
    return (time.perf_counter() - start) / len(images)


def _time_zero_shot_step(ctx: Context, text_features: torch.Tensor) -> float:
    """Seconds of a zero-shot training step (batch 1, per-image text features, from images)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images, masks, labels, has_masks = _train_inputs(ctx)
    features = text_features[None]
    optimizers = make_optimizers(model, 1e-4)
    state = model.adapter_state()

    def step() -> None:
        with autocast_for(device, cfg.precision):
            train_step(model, optimizers, images, masks, labels, features, has_masks)

    result = float(np.median([seconds(step, device) for _ in range(max(2, cfg.train_rounds))]))
    model.load_adapter_state(state)
    return result


def section_protocol(ctx: Context) -> list[Row]:
    """The parts of engine.run's few-shot training, in its order: prefix caches (one-off), then per
    epoch the training steps, the memory bank and the evaluation of the test set."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    text_features = ctx.text_features()
    config = _protocol_config(ctx, epochs=2)
    few_shot = _few_shot_data(ctx, cfg.protocol_train_images, cfg.protocol_bank_images)
    data = random_test_set(cfg.protocol_test_images, cfg.img_size, seed=5)
    warm = random_test_set(min(4, cfg.protocol_test_images), cfg.img_size, seed=6)
    evaluate(model, warm, text_features, True, None, cfg.eval_batch_size, cfg.precision)  # warm-up

    budget = engine.PrefixBudget(config.prefix_cache, device)
    support_cache_s = seconds(lambda: engine.cache_support_prefixes(model, few_shot, config, budget), device)
    test_cache_s = 0.0
    if budget.allow(evaluation_prefix_bytes(model, len(data))):
        test_cache_s = seconds(lambda: data.cache_prefixes(model, cfg.eval_batch_size, cfg.precision), device)
    cached = f"support {'cached' if few_shot.support_prefixes is not None else 'NOT cached'}, " \
             f"bank {'cached' if few_shot.memory_cache is not None else 'NOT cached'}, " \
             f"test set {'cached' if data.prefix_cache is not None else 'NOT cached'} (--prefix_cache {config.prefix_cache})"

    train_s, first_epoch_extra = _time_training(ctx, config, few_shot, text_features)
    train_per_image = train_s / cfg.protocol_train_images

    def bank() -> object:
        return build_memory_bank(model, few_shot.normal_images, cfg.eval_batch_size, cfg.precision, few_shot.memory_cache,
                                 branches=(bank_branch(True),))  # as the engine: the branch a dataset with masks reads

    bank_s = seconds(bank, device)
    memory_bank = bank()
    few_s = seconds(lambda: evaluate(model, data, text_features, True, memory_bank, cfg.eval_batch_size, cfg.precision), device)
    zero_s = seconds(lambda: evaluate(model, data, text_features, True, None, cfg.eval_batch_size, cfg.precision), device)
    few_per_image = few_s / len(data)
    zero_per_image = zero_s / len(data)
    bank_per_image = bank_s / cfg.protocol_bank_images
    cache_per_image = (support_cache_s / (cfg.protocol_train_images + cfg.protocol_bank_images),
                       test_cache_s / len(data))
    decode = _time_decode(ctx)
    zero_step = _time_zero_shot_step(ctx, text_features)

    few_once = (FEW_SHOT_TRAIN_IMAGES + FEW_SHOT_BANK_IMAGES) * cache_per_image[0] + \
        BRAIN_TEST_IMAGES * cache_per_image[1] + first_epoch_extra
    few_total = few_once + EPOCHS * (FEW_SHOT_TRAIN_IMAGES * train_per_image + FEW_SHOT_BANK_IMAGES * bank_per_image
                                     + BRAIN_TEST_IMAGES * few_per_image)
    zero_total = ZERO_SHOT_TEST_IMAGES * cache_per_image[1] + EPOCHS * ZERO_SHOT_TRAIN_IMAGES * (zero_step + decode) \
        + ZERO_SHOT_EVALS * ZERO_SHOT_TEST_IMAGES * zero_per_image
    sizes = (f"{cfg.protocol_train_images} train images x 2 epochs, {cfg.protocol_bank_images} bank images, "
             f"{len(data)} test images, eval batch {cfg.eval_batch_size}, {cfg.precision}")
    rows = [
        Row("prefix cache s per support/bank image (one-off)", cache_per_image[0], "s", note=cached),
        Row("prefix cache s per test image (one-off)", cache_per_image[1], "s"),
        Row("training s per image (engine loop, batch 1)", train_per_image, "s", note=f"second epoch; {sizes}"),
        Row("training, first epoch's extra over the second", first_epoch_extra, "s"),
        Row("memory bank s per image", bank_per_image, "s"),
        Row("few-shot evaluation s per image (fused maps, pixel AUROC)", few_per_image, "s",
            note=f"evaluate over {len(data)} images"),
        Row("zero-shot evaluation s per image (maps, pixel AUROC)", zero_per_image, "s"),
        Row("zero-shot training step s (per-image text, from images)", zero_step, "s",
            note="the zero-shot loop decodes and runs every image each epoch (no prefix cache)"),
        Row("image decode s per image (PNG, resize)", decode, "s"),
    ]
    few_note = (f"{EPOCHS} x ({FEW_SHOT_TRAIN_IMAGES} steps + bank of {FEW_SHOT_BANK_IMAGES} + "
                f"{BRAIN_TEST_IMAGES} test images) + prefix caches once")
    zero_note = (f"{EPOCHS} x {ZERO_SHOT_TRAIN_IMAGES} steps (+ decode) + {ZERO_SHOT_EVALS} evaluations "
                 f"of {ZERO_SHOT_TEST_IMAGES} images")
    if device.type == "cuda":
        rows.append(checked("few-shot protocol, extrapolated", few_total / 60, "min", "<", TARGET_FEW_SHOT_MIN, few_note))
        rows.append(checked("zero-shot protocol, extrapolated", zero_total / 60, "min", "<", TARGET_ZERO_SHOT_MIN, zero_note))
    else:
        rows.append(Row("few-shot protocol, extrapolated", few_total / 60, "min",
                        note=few_note + f"; the target (< {TARGET_FEW_SHOT_MIN:g} min) is for an H100"))
        rows.append(Row("zero-shot protocol, extrapolated", zero_total / 60, "min",
                        note=zero_note + f"; the target (< {TARGET_ZERO_SHOT_MIN:g} min) is for an H100"))
    return rows


# ------------------------------------------------------------------------------------------------
# 4. auroc


def _sklearn_seconds(n: int) -> float:
    from sklearn.metrics import roc_auc_score

    scores, labels = bench_metrics.make_data(n, 0.05, 1)
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
        res = bench_metrics.run(args)
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
    rows.append(checked("|pixel_auroc - sklearn|, same data", res["abs_diff"], "", "<=", TARGET_AUROC_DIFF))
    rows.append(checked("pixel_auroc peak extra memory / scores size",
                        res["pixel_auroc_peak_extra_bytes"] / res["scores_bytes"], "x", "<=", TARGET_AUROC_MEMORY,
                        note=f"{res['pixel_auroc_peak_extra_bytes'] / 1e9:.3f} GB ({res['peak_extra_source']}) over "
                             f"{res['scores_bytes'] / 1e9:.3f} GB of scores"))
    return rows


# ------------------------------------------------------------------------------------------------
# 5. memory


class PeakRSS:
    """Peak resident memory of this process inside a `with` block, beyond what it held on entry.

    Resets the kernel's high-water mark (writing 5 to /proc/self/clear_refs) and reads VmHWM; where
    that is refused, samples VmRSS on a thread every millisecond."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = _status_kib("VmRSS")
        self._sampled = 0
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _status_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, _status_kib("VmRSS"))
        self.growth = max(0, self.peak - self.start) * 1024


def require_proc() -> None:
    """CPU peak memory is read from /proc/self/status (Linux)."""
    if not Path("/proc/self/status").is_file():
        raise SkipSection("peak RSS needs Linux's /proc/self/status")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class PeakCUDA:
    """Peak CUDA memory allocated inside a `with` block beyond what was allocated on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.growth = torch.cuda.max_memory_allocated(self.device) - self.start


def measure_memory(ctx: Context) -> dict:
    """The memory figures, measured in this process (a fresh child process on the CPU)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    peak = (lambda: PeakCUDA(device)) if device.type == "cuda" else PeakRSS
    text_features = ctx.text_features()
    bank = build_memory_bank(model, random_images(2, cfg.img_size, 7).float() / 255, cfg.eval_batch_size, cfg.precision,
                             branches=(bank_branch(True),))
    evaluate(model, random_test_set(2, cfg.img_size, 8), text_features, True, bank, cfg.eval_batch_size, cfg.precision)
    out = {"eval": {}}
    for count in cfg.memory_images:
        data = random_test_set(count, cfg.img_size, seed=9)
        with peak() as p:
            result = evaluate(model, data, text_features, True, bank, cfg.eval_batch_size, cfg.precision)
        out["eval"][count] = p.growth
        del result, data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    patches = model.grid_size**2
    queries = cfg.eval_batch_size * patches
    embed = model.embed_dim
    generator = torch.Generator(device=device).manual_seed(10)
    q = torch.randn(queries, embed, generator=generator, device=device)
    b = torch.randn(cfg.bank_tokens, embed, generator=generator, device=device)
    with peak() as p:
        scoring.max_cosine_to_bank(q, b)
    unit = scoring.normalize_bank(b)
    del b
    with peak() as p_unit:
        scoring.max_cosine_to_bank(q, unit, normalized=True)
    out["bank"] = {"queries": queries, "tokens": cfg.bank_tokens, "embed": embed, "peak": p.growth,
                   "peak_normalized": p_unit.growth, "bank_bytes": unit.numel() * 4,
                   "qb_bytes": queries * cfg.bank_tokens * 4}
    out["map_bytes"] = cfg.img_size * cfg.img_size * 4
    out["prefix_bytes"] = evaluation_prefix_bytes(model, 1)
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    out["source"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "RSS high-water mark (VmHWM)" + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")
    return out


def section_memory(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    if ctx.device.type == "cuda":
        m = measure_memory(ctx)
    else:
        require_proc()
        # a fresh process (this one's allocator holds memory freed by earlier sections), with a fixed
        # mmap threshold: blocks over 128 KiB go back to the system when freed, so RSS follows live memory
        m = run_child("memory", cfg, MALLOC_MMAP_THRESHOLD_="131072")
        m["eval"] = {int(k): v for k, v in m["eval"].items()}
    (m1, g1), (m2, g2) = sorted(m["eval"].items())
    slope = (g2 - g1) / (m2 - m1)
    rows = [Row(f"evaluate peak growth, {count} images", growth / 1e6, "MB",
                note=f"few-shot with masks, batch {cfg.eval_batch_size}; {m['source']}")
            for count, growth in sorted(m["eval"].items())]
    beyond_note = f"slope between {m1} and {m2} images, minus the map"
    if slope < m["map_bytes"]:
        beyond_note += ("; the peak grew by less than the maps: it is a batch's forward, reached before every "
                        "map is written, and the per-image memory beyond the maps is below this measurement's resolution")
    rows += [
        Row("evaluate peak growth per image", slope, "bytes", note=f"slope between {m1} and {m2} images"),
        Row("fused map bytes per image", m["map_bytes"], "bytes", note=f"{cfg.img_size} x {cfg.img_size} x 4"),
        Row("evaluate bytes per image beyond the maps", slope - m["map_bytes"], "bytes", note=beyond_note),
        Row("evaluate fixed peak beyond per-image memory", (g1 - slope * m1) / 1e6, "MB",
            note="intercept: a batch's activations, the bank, scratch"),
    ]
    rows.append(Row("prefix cache bytes per image (sets evaluated every epoch)", m["prefix_bytes"], "bytes",
                    note="frozen-block outputs kept by --prefix_cache while training"))
    bank = m["bank"]
    rows.append(checked("bank search peak / (Q x B x 4 bytes)", bank["peak"] / bank["qb_bytes"], "x", "<", 1.0,
                        note=f"Q={bank['queries']} patches, B={bank['tokens']:,} tokens, D={bank['embed']}: "
                             f"peak {bank['peak'] / 1e6:.1f} MB, Q x B x 4 = {bank['qb_bytes'] / 1e6:.1f} MB, "
                             f"the bank itself {bank['bank_bytes'] / 1e6:.1f} MB"))
    rows.append(Row("bank search peak / (Q x B x 4 bytes), bank normalised once", bank["peak_normalized"] / bank["qb_bytes"],
                    "x", note=f"scoring.normalize_bank, then normalized=True: peak {bank['peak_normalized'] / 1e6:.1f} MB "
                              "(no per-search copy of the bank)"))
    return rows


# ------------------------------------------------------------------------------------------------
# 6. startup


def encode_text_full_context(clip_model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The release's text encoder: all 77 positions through the causal transformer (the model
    itself encodes only up to the longest prompt's end token, which gives the same features)."""
    x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
    x = clip_model.ln_final(clip_model.transformer(x, causal=True))
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ clip_model.text_projection


@torch.no_grad()
def prompt_ensemble_full_context(clip_model: CLIP, object_word: str) -> torch.Tensor:
    """mvfa.text.encode_prompt_ensemble with the release's full-context encoder."""
    device = next(clip_model.parameters()).device
    columns = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        tokens = tokenize(state_sentences(object_word, states)).to(device)
        embeddings = F.normalize(encode_text_full_context(clip_model, tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def section_startup(ctx: Context) -> list[Row]:
    cfg, device = ctx.cfg, ctx.device
    clip_model = ctx.clip_model
    word = "Brain"
    prompts = len(NORMAL_STATES + ABNORMAL_STATES) * len(TEMPLATES)
    if device.type == "cuda":  # warm-up: CUDA kernels for both shapes
        prompt_ensemble_full_context(clip_model, word)
        text_module.encode_prompt_ensemble(clip_model, word)
    full, full_features = timed_value(lambda: prompt_ensemble_full_context(clip_model, word), device, cfg.startup_repeats)
    trimmed, trimmed_features = timed_value(lambda: text_module.encode_prompt_ensemble(clip_model, word), device,
                                            cfg.startup_repeats)
    difference = float((full_features - trimmed_features).abs().max())
    longest = max(int(tokenize(state_sentences(word, s)).argmax(dim=-1).max()) + 1 for s in (NORMAL_STATES, ABNORMAL_STATES))
    rows = [
        Row("text features s, full 77-position context (release)", full, "s",
            note=f"{prompts} prompts, tokenizing included, {device.type}"),
        Row("text features s, trimmed context (mvfa.text)", trimmed, "s", note=f"{longest} of 77 positions"),
        Row("text speed-up, trimmed vs full context", full / trimmed, "x"),
        Row("max |trimmed - full| of the text features", difference, "", note="the same features, fp32"),
    ]
    bank_class = getattr(text_module, "TextFeatureBank", None)
    if bank_class is None or "cache_dir" not in bank_class.__init__.__code__.co_varnames:
        rows.append(Row("text features s, on-disk cache hit", "skipped", "", note="mvfa.text has no on-disk cache"))
        return rows
    cache_dir = ctx.tmp / "text-cache"
    bank_class(clip_model, cache_dir)(word)  # fills the cache
    hit = best_of(lambda: bank_class(clip_model, cache_dir)(word), device, max(3, cfg.startup_repeats), warmup=0)
    rows.append(Row("text features s, on-disk cache hit", hit, "s",
                    note="a new TextFeatureBank: fingerprint of the text tower's weights + torch.load"))
    rows.append(Row("text speed-up, cache hit vs trimmed context", trimmed / hit, "x"))
    return rows


# ------------------------------------------------------------------------------------------------
# 7. process: test_few.py against a release emulation, as subprocesses


def release_block(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block whose attention is an explicit softmax returning the head-averaged attention
    weights, as the release's open_clip blocks (nn.MultiheadAttention with need_weights)."""
    attention = block.attn
    h = block.ln_1(x)
    batch, tokens, width = h.shape
    heads = attention.heads
    qkv = F.linear(h, attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * (width // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + attention.out_proj(out)
    return x + block.mlp(block.ln_2(x)), weights.mean(dim=1)


def release_forward(model: AdaptedViT, images: torch.Tensor):
    """The release's CLIP_Inplanted forward: every block through release_block, adapters at the stages,
    the pooled class token; returns (pooled, seg tokens, det tokens), class tokens included."""
    visual = model.visual
    x = visual.embed(images)
    seg, det, kept_attention = [], [], []
    for number, block in enumerate(visual.transformer.resblocks, start=1):
        x, weights = release_block(block, x)
        if number == 12:
            kept_attention.append(weights)  # the release keeps one attention map
        if number in model.stages:
            i = model.stages.index(number)
            seg_mid, seg_out = model.seg_adapters[i](x)
            det_mid, det_out = model.det_adapters[i](x)
            x = STREAM_KEEP * x + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
            seg.append(seg_mid)
            det.append(det_mid)
        if number == max(model.stages):
            break
    return visual.pool(x), seg, det


def _min_max(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def release_load_clip(model_name: str, size: int, path: str) -> CLIP:
    """The release's loading (kept as it was, whatever CLIP.create_model does now): a randomly
    initialised fp32 CLIP, the whole checkpoint in memory (as `torch.jit.load` holds OpenAI's archive),
    converted to fp32 in one dict and copied in by `load_state_dict`. Random weights, the fp16
    checkpoint and its fp32 copy coexist."""
    clip_model = CLIP(load_config(model_name), image_size=size)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict["visual.positional_embedding"] = resample_positional_embedding(
        state_dict["visual.positional_embedding"].float(), clip_model.visual.grid_size)
    clip_model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return clip_model


def release_test_few(a: dict) -> None:
    """The work of test_few.py done the release's way (CPU, fp32): random-init CLIP then weights,
    every parameter requires grad, prompts over 77 positions, batch 1 throughout, attention maps
    materialised, per-image maps kept as numpy, sklearn's roc_auc_score over all pixels."""
    from sklearn.metrics import roc_auc_score

    from dataset.medical import ImageSet, open_dataset, select_support

    torch.manual_seed(a["seed"])
    size = a["img_size"]
    clip_model = release_load_clip(a["model_name"], size, a["clip_ckpt"]).eval()
    model = AdaptedViT(clip_model, a["stages"]).eval()
    model.load_adapter_state(torch.load(a["adapters"], map_location="cpu", weights_only=True))
    clip_model.requires_grad_(True)
    model.requires_grad_(True)
    make_optimizers(model, 1e-3)  # built by the release's test script too
    dataset = open_dataset(a["data_path"], "Brain")
    support = select_support(dataset, a["shot"], -1, a["seed"], [])
    abnormal = ImageSet(support.abnormal, size)
    normal = ImageSet(support.normal, size)
    abnormal_images = torch.stack([abnormal[i]["image"] for i in range(len(abnormal))])
    abnormal_masks = torch.stack([abnormal[i]["mask"] for i in range(len(abnormal))])
    augment(abnormal_images, abnormal_masks)  # the release augments the abnormal support too
    normal_images, _ = augment(torch.stack([normal[i]["image"] for i in range(len(normal))]))
    text_features = prompt_ensemble_full_context(clip_model, "Brain")

    seg_bank = [[] for _ in a["stages"]]
    with torch.no_grad():
        for i in range(normal_images.shape[0]):
            _, seg, _ = release_forward(model, normal_images[i : i + 1])
            for stage, tokens in enumerate(seg):
                seg_bank[stage].append(tokens[0])
    seg_bank = [torch.cat(tokens) for tokens in seg_bank]

    test = ImageSet(dataset.samples("test"), size)
    zero_maps, few_maps, masks, labels = [], [], [], []
    for i in range(len(test)):
        item = test[i]
        masks.append(item["mask"][0].numpy() > 0.5)
        labels.append(item["label"])
        with torch.no_grad():
            _, seg, _ = release_forward(model, item["image"][None])
            seg = [tokens[0, 1:] for tokens in seg]
            few = []
            for stage, patches in enumerate(seg):
                cos = F.normalize(seg_bank[stage], dim=-1) @ F.normalize(patches, dim=-1).T  # [bank, patches]
                grid = int(math.isqrt(cos.shape[1]))
                distance = torch.min(1 - cos, 0)[0].reshape(1, 1, grid, grid)
                few.append(F.interpolate(distance, size=size, mode="bilinear", align_corners=True)[0].numpy())
            few_maps.append(np.sum(few, axis=0))
            zero = []
            for patches in seg:
                logits = (100.0 * F.normalize(patches, dim=-1) @ text_features)[None]
                grid = int(math.isqrt(logits.shape[1]))
                logits = logits.permute(0, 2, 1).reshape(1, 2, grid, grid)
                upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
                zero.append(torch.softmax(upsampled, dim=1)[:, 1].numpy())
            zero_maps.append(np.sum(zero, axis=0))
    scores = 0.5 * _min_max(np.array(zero_maps)) + 0.5 * _min_max(np.array(few_maps))
    gt = np.asarray(masks).astype(np.int_)
    pixel = roc_auc_score(gt.flatten(), scores.flatten())
    image = roc_auc_score(np.array(labels), scores.reshape(scores.shape[0], -1).max(axis=1))
    print(f"Brain AUC : {round(image, 4)}")
    print(f"Brain pAUC : {round(pixel, 4)}")


def child_env(cfg: BenchConfig, **extra: str) -> dict:
    """This environment, with the repository on PYTHONPATH (children run `-m mvfa.bench`, test_few.py)
    and the run's thread count."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    threads = {"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {}
    return {**os.environ, "PYTHONPATH": path, **threads, **extra}


def run_measured(command: list[str], log: Path, env: dict) -> dict:
    """Run `python -m mvfa.bench --_child ...` to completion: wall seconds and the child's own peak RSS.

    The child reports its VmHWM itself: the rusage of a child started from a large parent (vfork,
    then exec) counts the parent's resident memory too."""
    report = log.with_suffix(".json")
    with open(log, "w") as out:
        start = time.perf_counter()
        done = subprocess.run([*command, "--json", str(report)], cwd=REPO_ROOT, stdout=out,
                              stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} ... exited with {done.returncode}:\n{log.read_text()[-2000:]}")
    return {"wall_s": wall, "maxrss_bytes": json.loads(report.read_text())["peak_rss_bytes"], "output": log.read_text()}


def _child_command(kind: str, args) -> list[str]:
    return [sys.executable, "-m", "mvfa.bench", "--_child", kind, "--_child_args", json.dumps(args)]


def section_process(ctx: Context) -> list[Row]:
    """test_few.py twice (the text-feature cache cold, then warm) and the release emulation once."""
    cfg = ctx.cfg
    require_proc()
    data = ctx.brain_data()
    config = load_config(cfg.model_name)
    torch.manual_seed(0)
    clip_model = create_model(cfg.model_name)  # at the config's own size: the checkpoint's grid is 24 x 24
    clip_ckpt = ctx.tmp / "clip.pt"
    torch.save({k: v.half() for k, v in clip_model.state_dict().items()}, clip_ckpt)  # fp16, as OpenAI's file
    adapters = ctx.tmp / "adapters.pth"
    torch.save(AdaptedViT(clip_model, list(cfg.stages)).adapter_state(), adapters)
    del clip_model
    gc.collect()
    env = child_env(ctx.cfg, MVFA_CACHE_DIR=str(ctx.tmp / "cache"), PYTHONUNBUFFERED="1")
    test_few = [
        "test_few.py", "--obj", "Brain", "--data_path", str(data), "--model_name", cfg.model_name,
        "--clip_ckpt", str(clip_ckpt), "--img_size", str(cfg.img_size), "--features_list", *map(str, cfg.stages),
        "--shot", str(cfg.process_shot), "--iterate", "-1", "--checkpoint", str(adapters),
        "--save_path", str(ctx.tmp / "ckpt"), "--output_dir", str(ctx.tmp / "results"), "--device", "cpu",
    ]
    cold = run_measured(_child_command("script", test_few), ctx.tmp / "test_few_cold.log", env)
    warm = run_measured(_child_command("script", test_few), ctx.tmp / "test_few_warm.log", env)
    release_args = {"data_path": str(data), "clip_ckpt": str(clip_ckpt), "adapters": str(adapters),
                    "model_name": cfg.model_name, "img_size": cfg.img_size, "stages": list(cfg.stages),
                    "shot": cfg.process_shot, "seed": 111}
    release = run_measured(_child_command("release_test_few", release_args), ctx.tmp / "release.log", env)
    bank_images = cfg.process_shot * AUGMENTATIONS
    adapted = AdaptedViT(create_model(cfg.model_name, cfg.img_size), list(cfg.stages)).eval()
    forwards = seconds_of_forwards(adapted, [bank_images, cfg.process_test_images], cfg.eval_batch_size)
    del adapted
    gc.collect()
    work = (f"{cfg.model_name} ({config.vision.layers} blocks, random weights, fp16 file), "
            f"{cfg.process_shot}-shot, {cfg.process_test_images} test images at {cfg.img_size} px, CPU")
    return [
        Row("test_few.py wall s, text cache cold", cold["wall_s"], "s", note=work),
        Row("test_few.py wall s, text cache warm", warm["wall_s"], "s", note="a second run: text features from disk"),
        Row("test_few.py peak RSS, cold", cold["maxrss_bytes"] / 1e9, "GB"),
        Row("test_few.py peak RSS, warm", warm["maxrss_bytes"] / 1e9, "GB"),
        Row("release emulation wall s", release["wall_s"], "s", note=RELEASE_ON_THIS_CPU),
        Row("release emulation peak RSS", release["maxrss_bytes"] / 1e9, "GB"),
        checked("test_few speed-up vs release emulation, cold", release["wall_s"] / cold["wall_s"], "x", ">=",
                TARGET_PROCESS_SPEEDUP),
        Row("test_few speed-up vs release emulation, warm", release["wall_s"] / warm["wall_s"], "x"),
        checked("test_few peak RSS / release emulation, cold", cold["maxrss_bytes"] / release["maxrss_bytes"], "x",
                "<=", TARGET_PROCESS_MEMORY),
        Row("the same ViT forwards alone, s", forwards, "s",
            note=f"{bank_images} bank + {cfg.process_test_images} test images at batch {cfg.eval_batch_size}, "
                 "in this process after the runs: the work both processes must do"),
        Row("speed-up ceiling: release emulation / forwards alone", release["wall_s"] / forwards, "x",
            note="what test_few would reach if it did nothing but these forwards"),
        Row("test_few wall s beyond the forwards, cold", cold["wall_s"] - forwards, "s"),
        Row("test_few wall s beyond the forwards, warm", warm["wall_s"] - forwards, "s"),
    ]


def seconds_of_forwards(model: AdaptedViT, image_counts: list[int], batch_size: int) -> float:
    """Wall seconds of the adapted ViT's no_grad forwards over sets of random images of these sizes,
    in batches of `batch_size` (the last one smaller), as test_few runs them (fp32, CPU)."""
    generator = torch.Generator().manual_seed(0)
    size = model.image_size
    start = time.perf_counter()
    with torch.no_grad():
        for count in image_counts:
            for first in range(0, count, batch_size):
                images = torch.rand(min(batch_size, count - first), 3, size, size, generator=generator)
                model(images)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Child processes (fresh allocators for memory figures, the release emulation)


def run_child(kind: str, cfg: BenchConfig, **env: str) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        command = [sys.executable, "-m", "mvfa.bench", "--_child", kind,
                   "--_child_args", json.dumps(dataclasses.asdict(cfg)), "--json", result.name]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=child_env(cfg, **env))
        if done.returncode != 0:
            raise RuntimeError(f"child {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(Path(result.name).read_text())


def child_main(kind: str, raw: str, json_path: str | None) -> int:
    """The child processes: a script run in-process (`script`: [path, *argv]), the release emulation,
    the memory measurement. The first two write their own peak RSS (VmHWM) to `json_path`."""
    args = json.loads(raw)
    if kind == "memory":
        fields = {f.name for f in dataclasses.fields(BenchConfig)}
        cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in fields})
        ctx = Context(cfg)
        try:
            result = measure_memory(ctx)
        finally:
            ctx.close()
        Path(json_path).write_text(json.dumps(result))
        return 0
    if kind == "script":
        import runpy

        sys.argv = list(args)
        sys.path.insert(0, str(REPO_ROOT))
        try:
            runpy.run_path(str(REPO_ROOT / args[0]), run_name="__main__")
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    elif kind == "release_test_few":
        release_test_few(args)
        code = 0
    else:
        raise SystemExit(f"unknown child {kind!r}")
    if json_path:
        Path(json_path).write_text(json.dumps({"exit": code, "peak_rss_bytes": _status_kib("VmHWM") * 1024}))
    return code


# ------------------------------------------------------------------------------------------------
# The run, the table, the JSON


SECTION_FUNCTIONS = {
    "forward": section_forward,
    "train_step": section_train_step,
    "protocol": section_protocol,
    "auroc": section_auroc,
    "memory": section_memory,
    "startup": section_startup,
    "process": section_process,
}


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if magnitude < 1000 else f"{value:,.0f}"


def format_table(rows: list[Row]) -> str:
    header = ("section", "figure", "value", "unit", "target", "result")
    cells = [(r.section, r.figure, format_value(r.value), r.unit, r.target or "",
              "" if r.ok is None else ("pass" if r.ok else "FAIL")) for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = []
    for index, cell in enumerate([header, *cells]):
        line = "  ".join(str(c).ljust(w) if i != 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
        lines.append(line.rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  [{r.section}] {r.figure}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig.for_device(device, args.smoke, args.full_protocol)
    overrides = {
        "protocol_test_images": args.test_images,
        "auroc_n": args.auroc_n,
        "sklearn_budget_s": args.sklearn_budget_s,
        "eval_batch_size": args.eval_batch_size,
        "bank_tokens": args.bank_tokens,
        "train_rounds": args.train_rounds,
        "threads": args.threads,
        "forward_batches": tuple(int(b) for b in args.forward_batches.split(",")) if args.forward_batches else None,
        "memory_images": tuple(int(b) for b in args.memory_images.split(",")) if args.memory_images else None,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if len(cfg.memory_images) != 2 or cfg.memory_images[0] >= cfg.memory_images[1]:
        raise SystemExit("--memory_images needs two increasing sizes, e.g. 8,16")
    return cfg


def write_json(path: str | None, report: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        return child_main(args._child, args._child_args, args.json)
    sections = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    ctx = Context(cfg)
    report = {"command": "python -m mvfa.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": dataclasses.asdict(cfg), "device": device_info(ctx.device), "sections": {}, "rows": []}
    print(f"mvfa.bench on {report['device']['cpu']} ({report['device']['cpu_cores']} cores), "
          f"GPU {report['device']['gpu']}, torch {torch.__version__}; device {cfg.device}", file=sys.stderr, flush=True)
    failed = False
    try:
        for name in sections:
            start = time.perf_counter()
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            try:
                rows = SECTION_FUNCTIONS[name](ctx)
                status = "ok"
            except SkipSection as skip:
                rows, status = [Row("skipped", str(skip))], "skipped"
            except Exception as err:  # one failing section must not lose the others' figures
                traceback.print_exc()
                message = (str(err).splitlines() or [""])[0][:200]
                rows, status, failed = [Row("error", f"{type(err).__name__}: {message}")], "error", True
            for row in rows:
                row.section = name
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            elapsed = time.perf_counter() - start
            report["rows"].extend(dataclasses.asdict(r) for r in rows)
            report["sections"][name] = {"status": status, "seconds": round(elapsed, 2)}
            print(f"[{name}] {status} in {elapsed:.1f} s", file=sys.stderr, flush=True)
            write_json(args.json, report)  # after each section: a killed run keeps what it measured
    finally:
        ctx.close()
    report["device"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.json, report)
    device = report["device"]
    print(f"machine: {device['cpu']}, {device['cpu_cores']} cores ({device['torch_threads']} torch threads); "
          f"GPU: {device['gpu'] or 'none'}; torch {device['torch']}; {device['date']}; "
          f"load average {device['load_average_at_start']} -> {device['load_average_at_end']}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    print(format_table([Row(**r) for r in report["rows"]]))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
