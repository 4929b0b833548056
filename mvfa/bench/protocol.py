"""Section protocol: per-image costs of the few-shot protocol's parts through the real code paths (the
runs' prefix caches, training loop, memory bank and evaluation), extrapolated to the release's
4-shot Brain protocol and to the zero-shot protocol."""
from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch

from .common import Context, random_images, random_test_set, seconds, sync, train_inputs
from .config import (
    BRAIN_TEST_IMAGES,
    EPOCHS,
    FEW_SHOT_BANK_IMAGES,
    FEW_SHOT_TRAIN_IMAGES,
    ZERO_SHOT_EVALS,
    ZERO_SHOT_TARGETS,
    ZERO_SHOT_TEST_IMAGES,
    ZERO_SHOT_TRAIN_IMAGES,
)
from .library import (
    FewShotData,
    FewShotScorer,
    GroupOptimizer,
    ImageSet,
    PrefixBudget,
    ReleaseRandom,
    RunConfig,
    Selector,
    Track,
    ZeroShotScorer,
    after_epoch,
    autocast_for,
    bank_branch,
    build_memory_bank,
    cache_set_prefixes,
    cache_support_prefixes,
    evaluate,
    few_shot_batches,
    group_train_step,
    make_optimizers,
    open_dataset,
    prefix_bytes,
    train_loop,
    train_step,
)
from .report import Row


def _protocol_config(ctx: Context, epochs: int) -> RunConfig:
    cfg = ctx.cfg
    return RunConfig(mode="few-shot", train=True, obj="Brain", data_path=ctx.tmp, save_path=ctx.tmp,
                     output_dir=ctx.tmp, model_name=cfg.model_name, img_size=cfg.img_size,
                     features_list=tuple(cfg.stages), epoch=epochs, select="last", batch_size=1,
                     eval_batch_size=cfg.eval_batch_size, device=str(ctx.device), precision=cfg.precision)


def _few_shot_data(ctx: Context, train_count: int, bank_count: int) -> FewShotData:
    """Random support images: half abnormal (with a mask), half normal; a separate set for the bank."""
    size = ctx.cfg.img_size
    support = random_images(train_count, size, seed=3).float() / 255
    masks = torch.zeros(train_count, 1, size, size)
    masks[: train_count // 2, :, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    labels = torch.cat([torch.ones(train_count // 2), torch.zeros(train_count - train_count // 2)])
    normal = random_images(bank_count, size, seed=4).float() / 255
    return FewShotData(support_images=support, support_masks=masks, support_labels=labels,
                       normal_images=normal, support_samples=[])


def _time_training(ctx: Context, config: RunConfig, few_shot: FewShotData,
                   text_features: torch.Tensor) -> tuple[float, float]:
    """Two epochs of the runs' own training loop (training.train_loop) over the support at batch 1.

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
        train_loop(config, ctx.model, timed_batches, [Track(selector, config.select)], ctx.device)
    sync(ctx.device)
    stamps.append(time.perf_counter())
    ctx.model.load_adapter_state(state)
    first, second = stamps[1] - stamps[0], stamps[2] - stamps[1]
    return second, max(0.0, first - second)


def _time_decode(ctx: Context) -> float:
    """Seconds per image to decode and resize a synthetic PNG (the zero-shot loader does it each epoch)."""
    samples = open_dataset(ctx.brain_data(), "Brain").samples("test")
    images = ImageSet(samples, ctx.cfg.img_size)
    start = time.perf_counter()
    for i in range(len(images)):
        images[i]
    return (time.perf_counter() - start) / len(images)


def _time_zero_shot_step(ctx: Context, text_features: torch.Tensor) -> float:
    """Seconds of a zero-shot training step (batch 1, per-image text features, from images)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images, masks, labels, has_masks = train_inputs(ctx)
    features = text_features[None]
    optimizers = make_optimizers(model, 1e-4)
    state = model.adapter_state()

    def step() -> None:
        with autocast_for(device, cfg.precision):
            train_step(model, optimizers, images, masks, labels, features, has_masks)

    result = float(np.median([seconds(step, device) for _ in range(max(2, cfg.train_rounds))]))
    model.load_adapter_state(state)
    return result


def _time_zero_shot_group_step(ctx: Context, text_features: torch.Tensor, runs: int) -> float:
    """Seconds of one lockstep step of `runs` zero-shot targets (reproduce's grouped runs: each target's
    adapters on one backbone, one image each, batch 1 per run, from images)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images, masks, labels, has_masks = train_inputs(ctx)
    models = [model] + [model.sibling() for _ in range(runs - 1)]
    optimizer = GroupOptimizer(models, [1e-4] * runs)
    state = model.adapter_state()
    batch = (images, masks, labels, text_features[None], has_masks.cpu(), None)

    def step() -> None:
        with autocast_for(device, cfg.precision):
            group_train_step(models, optimizer, [batch] * runs)

    result = float(np.median([seconds(step, device) for _ in range(max(2, cfg.train_rounds))]))
    model.load_adapter_state(state)
    return result


def section_protocol(ctx: Context) -> list[Row]:
    """The parts of a few-shot run's training, in its order: prefix caches (one-off), then per
    epoch the training steps, the memory bank and the evaluation of the test set."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    text_features = ctx.text_features()
    config = _protocol_config(ctx, epochs=2)
    few_shot = _few_shot_data(ctx, cfg.protocol_train_images, cfg.protocol_bank_images)
    data = random_test_set(cfg.protocol_test_images, cfg.img_size, seed=5)
    warm = random_test_set(min(4, cfg.protocol_test_images), cfg.img_size, seed=6)
    zero_shot = ZeroShotScorer(text_features, True)
    evaluate(model, zero_shot, warm, batch_size=cfg.eval_batch_size, precision=cfg.precision)  # warm-up

    budget = PrefixBudget(config.prefix_cache, device)
    support_cache_s = seconds(lambda: cache_support_prefixes(model, few_shot, config, budget), device)
    test_cache_s = 0.0
    if budget.allow(prefix_bytes(model, len(data))):
        test_cache_s = seconds(lambda: cache_set_prefixes(data, model, cfg.eval_batch_size, cfg.precision), device)
    cached = f"support {'cached' if few_shot.support_prefixes is not None else 'NOT cached'}, " \
             f"bank {'cached' if few_shot.memory_cache is not None else 'NOT cached'}, " \
             f"test set {'cached' if data.prefix_cache is not None else 'NOT cached'} (--prefix_cache {config.prefix_cache})"

    train_s, first_epoch_extra = _time_training(ctx, config, few_shot, text_features)
    train_per_image = train_s / cfg.protocol_train_images

    def bank() -> object:
        return build_memory_bank(model, few_shot.normal_images, cfg.eval_batch_size, cfg.precision, few_shot.memory_cache,
                                 branches=(bank_branch(True),))  # as a run: the branch a dataset with masks reads

    bank_s = seconds(bank, device)
    memory_bank = bank()
    few_shot_scorer = FewShotScorer(text_features, True, memory_bank)
    few_s = seconds(lambda: evaluate(model, few_shot_scorer, data, batch_size=cfg.eval_batch_size, precision=cfg.precision),
                    device)
    zero_s = seconds(lambda: evaluate(model, zero_shot, data, batch_size=cfg.eval_batch_size, precision=cfg.precision),
                     device)
    few_per_image = few_s / len(data)
    zero_per_image = zero_s / len(data)
    bank_per_image = bank_s / cfg.protocol_bank_images
    cache_per_image = (support_cache_s / (cfg.protocol_train_images + cfg.protocol_bank_images),
                       test_cache_s / len(data))
    decode = _time_decode(ctx)
    zero_step = _time_zero_shot_step(ctx, text_features)
    zero_group_step = _time_zero_shot_group_step(ctx, text_features, ZERO_SHOT_TARGETS)

    few_once = (FEW_SHOT_TRAIN_IMAGES + FEW_SHOT_BANK_IMAGES) * cache_per_image[0] + \
        BRAIN_TEST_IMAGES * cache_per_image[1] + first_epoch_extra
    few_total = few_once + EPOCHS * (FEW_SHOT_TRAIN_IMAGES * train_per_image + FEW_SHOT_BANK_IMAGES * bank_per_image
                                     + BRAIN_TEST_IMAGES * few_per_image)
    zero_evals = ZERO_SHOT_TEST_IMAGES * cache_per_image[1] + ZERO_SHOT_EVALS * ZERO_SHOT_TEST_IMAGES * zero_per_image
    zero_total = zero_evals + EPOCHS * ZERO_SHOT_TRAIN_IMAGES * (zero_step + decode)
    # in lockstep the targets share each step; each target's images are decoded and its evaluations made apart
    zero_group_total = ZERO_SHOT_TARGETS * zero_evals + EPOCHS * ZERO_SHOT_TRAIN_IMAGES * (
        zero_group_step + ZERO_SHOT_TARGETS * decode)
    sizes = (f"{cfg.protocol_train_images} train images x 2 epochs, {cfg.protocol_bank_images} bank images, "
             f"{len(data)} test images, eval batch {cfg.eval_batch_size}, {cfg.precision}")
    few_note = (f"{EPOCHS} x ({FEW_SHOT_TRAIN_IMAGES} steps + bank of {FEW_SHOT_BANK_IMAGES} + "
                f"{BRAIN_TEST_IMAGES} test images) + prefix caches once")
    zero_note = (f"{EPOCHS} x {ZERO_SHOT_TRAIN_IMAGES} steps (+ decode) + {ZERO_SHOT_EVALS} evaluations "
                 f"of {ZERO_SHOT_TEST_IMAGES} images")
    return [
        Row("prefix cache s per support/bank image (one-off)", cache_per_image[0], "s", note=cached),
        Row("prefix cache s per test image (one-off)", cache_per_image[1], "s"),
        Row("training s per image (training loop, batch 1)", train_per_image, "s", note=f"second epoch; {sizes}"),
        Row("training, first epoch's extra over the second", first_epoch_extra, "s"),
        Row("memory bank s per image", bank_per_image, "s"),
        Row("few-shot evaluation s per image (fused maps, pixel AUROC)", few_per_image, "s",
            note=f"evaluate over {len(data)} images"),
        Row("zero-shot evaluation s per image (maps, pixel AUROC)", zero_per_image, "s"),
        Row("zero-shot training step s (per-image text, from images)", zero_step, "s",
            note="the zero-shot loop decodes and runs every image each epoch (no prefix cache)"),
        Row("zero-shot training steps/s, one target", 1 / zero_step, "1/s"),
        Row(f"zero-shot training steps/s, {ZERO_SHOT_TARGETS} targets in lockstep", 1 / zero_group_step, "1/s",
            note=f"a lockstep step steps every target once: {ZERO_SHOT_TARGETS * zero_step / zero_group_step:.2f}x "
                 "the targets' steps of one-by-one runs"),
        Row("image decode s per image (PNG, resize)", decode, "s"),
        Row("few-shot protocol, extrapolated", few_total / 60, "min", note=few_note),
        Row("zero-shot protocol, extrapolated", zero_total / 60, "min", note=zero_note),
        Row(f"zero-shot protocol, {ZERO_SHOT_TARGETS} targets in lockstep, extrapolated", zero_group_total / 60, "min",
            note=f"{EPOCHS} x {ZERO_SHOT_TRAIN_IMAGES} lockstep steps (+ each target's decode) + each target's "
                 "evaluations as above"),
    ]
