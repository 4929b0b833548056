"""Section forward: FLOPs per image (analytic and counted by torch) and the adapted ViT's forward
speed, against a large matrix product measured in the same run."""
from __future__ import annotations

import time

import torch

from .common import Context, best_of, sync, torch_threads
from .library import autocast_for, load_config
from .report import Row


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
    """adapted_vit_flops of the run's model: widths from the model, patch size and MLP ratio from its config."""
    vision = load_config(ctx.cfg.model_name).vision
    return adapted_vit_flops(ctx.model.width, vision.patch_size, ctx.cfg.img_size, ctx.model.embed_dim,
                             ctx.cfg.stages, vision.mlp_ratio)


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


def single_thread_rates(ctx: Context, batch: int, per_image: float) -> tuple[float, float]:
    """(forward FLOP/s, matmul FLOP/s) on one thread; the matmul is timed before and after the forward."""
    cfg = ctx.cfg
    with torch_threads(1):
        matmul = matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats)
        forward = forward_rate(ctx, batch, "fp32") * per_image
        matmul = max(matmul, matmul_flops_per_s(cfg.matmul_size, torch.float32, ctx.device, cfg.matmul_repeats))
    return forward, matmul


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
            note="the transformer blocks alone (~184 GFLOP for ViT-L/14 at 240 px)"),
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
        rows.append(Row("forward images/s, best", best[0], "img/s", note=f"{best[1]}, batch {best[2]}"))
        matmul = matmul_flops_per_s(cfg.matmul_size, torch.bfloat16, ctx.device, cfg.matmul_repeats)
        achieved = best[0] * per_image
        rows.append(Row(f"bf16 matmul TFLOP/s ({cfg.matmul_size}^3 torch.mm)", matmul / 1e12, "TFLOP/s"))
        rows.append(Row("forward TFLOP/s at the best batch", achieved / 1e12, "TFLOP/s"))
        rows.append(Row("forward / bf16 matmul FLOP/s", achieved / matmul, "x"))
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
    rows.append(Row("forward / matmul FLOP/s", best[0] / matmul, "x", note=f"{torch.get_num_threads()} threads"))
    if torch.get_num_threads() > 1:
        single_forward, single_matmul = single_thread_rates(ctx, best[1], per_image)
        rows.append(Row("forward GFLOP/s, 1 thread", single_forward / 1e9, "GFLOP/s", note=f"batch {best[1]}"))
        rows.append(Row("fp32 matmul GFLOP/s, 1 thread", single_matmul / 1e9, "GFLOP/s"))
        rows.append(Row("forward / matmul FLOP/s, 1 thread", single_forward / single_matmul, "x",
                        note="the model's code without thread barriers: on a shared machine a descheduled thread "
                             "stalls every parallel operator of the forward, and much less a large matmul"))
    return rows
