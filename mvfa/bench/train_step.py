"""Section train_step: mvfa.runs.training.train_step (from images and from a cached prefix) against the
release's step, interleaved."""
from __future__ import annotations

import numpy as np
import torch

from .common import Context, seconds, train_inputs
from .library import autocast_for, make_optimizers, train_step
from .release import release_train_step
from .report import Row


def section_train_step(ctx: Context) -> list[Row]:
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    images, masks, labels, has_masks = train_inputs(ctx)
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
    note = f"median of {cfg.train_rounds} interleaved steps, batch 1, {cfg.precision}"
    return [
        Row("train step s, release emulation (backbone weight grads)", median["release"], "s", note=note),
        Row("train step s, train_step from images", median["ours"], "s", note=note),
        Row("train step s, train_step from a cached prefix", median["cached"], "s", note=note),
        Row("train step speed-up vs release, from images", median["release"] / median["ours"], "x"),
        Row("train step speed-up vs release, cached prefix", median["release"] / median["cached"], "x"),
    ]
