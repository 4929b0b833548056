"""Section process: test_few.py as a whole process on the CPU (text cache cold, then warm) against the
release emulation of the same work, both as child processes; then the same ViT forwards alone."""
from __future__ import annotations

import gc
import time

import torch

from .children import child_command, child_env, run_measured
from .common import Context
from .library import AUGMENTATIONS, AdaptedViT, create_model, load_config, save_torch_atomic
from .peak_memory import require_proc
from .report import Row

RELEASE_ON_THIS_CPU = "the real release took ~200 s and 4.5 GB on the project's 2-core CPU (issue)"


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


def section_process(ctx: Context) -> list[Row]:
    """test_few.py twice (the text-feature cache cold, then warm) and the release emulation once."""
    cfg = ctx.cfg
    require_proc()
    data = ctx.brain_data()
    config = load_config(cfg.model_name)
    torch.manual_seed(0)
    clip_model = create_model(cfg.model_name)  # at the config's own size: the checkpoint's grid is 24 x 24
    clip_ckpt = ctx.tmp / "clip.pt"
    save_torch_atomic({k: v.half() for k, v in clip_model.state_dict().items()}, clip_ckpt)  # fp16, as OpenAI's file
    adapters = ctx.tmp / "adapters.pth"
    save_torch_atomic(AdaptedViT(clip_model, list(cfg.stages)).adapter_state(), adapters)
    del clip_model
    gc.collect()
    env = child_env(ctx.cfg, MVFA_CACHE_DIR=str(ctx.tmp / "cache"), PYTHONUNBUFFERED="1")
    test_few = [
        "test_few.py", "--obj", "Brain", "--data_path", str(data), "--model_name", cfg.model_name,
        "--clip_ckpt", str(clip_ckpt), "--img_size", str(cfg.img_size), "--features_list", *map(str, cfg.stages),
        "--shot", str(cfg.process_shot), "--iterate", "-1", "--checkpoint", str(adapters),
        "--save_path", str(ctx.tmp / "ckpt"), "--output_dir", str(ctx.tmp / "results"), "--device", "cpu",
    ]
    cold = run_measured(child_command("script", test_few), ctx.tmp / "test_few_cold.log", env)
    warm = run_measured(child_command("script", test_few), ctx.tmp / "test_few_warm.log", env)
    release_args = {"data_path": str(data), "clip_ckpt": str(clip_ckpt), "adapters": str(adapters),
                    "model_name": cfg.model_name, "img_size": cfg.img_size, "stages": list(cfg.stages),
                    "shot": cfg.process_shot, "seed": 111}
    release = run_measured(child_command("release_test_few", release_args), ctx.tmp / "release.log", env)
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
        Row("test_few speed-up vs release emulation, cold", release["wall_s"] / cold["wall_s"], "x"),
        Row("test_few speed-up vs release emulation, warm", release["wall_s"] / warm["wall_s"], "x"),
        Row("test_few peak RSS / release emulation, cold", cold["maxrss_bytes"] / release["maxrss_bytes"], "x"),
        Row("the same ViT forwards alone, s", forwards, "s",
            note=f"{bank_images} bank + {cfg.process_test_images} test images at batch {cfg.eval_batch_size}, "
                 "in this process after the runs: the work both processes must do"),
        Row("speed-up ceiling: release emulation / forwards alone", release["wall_s"] / forwards, "x",
            note="what test_few would reach if it did nothing but these forwards"),
        Row("test_few wall s beyond the forwards, cold", cold["wall_s"] - forwards, "s"),
        Row("test_few wall s beyond the forwards, warm", warm["wall_s"] - forwards, "s"),
    ]
