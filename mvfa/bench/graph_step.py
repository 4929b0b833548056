"""Steps/s of the training step of runs trained together: eager (training.group_train_step) against
replayed from CUDA graphs (mvfa.runs.graph_step.CapturedStep). Batch 1 per run from cached prefixes,
every image with a mask (both losses, both Adam updates), fp32, random weights (the cost does not depend
on their values). scripts/gpu_graph_step.sh runs it on a lent GPU:

    python -m mvfa.bench.graph_step --model ViT-L-14-336 --size 240 --stages 6 12 18 24 --runs 1 6

Not on CUDA only the eager step is timed (CUDA graphs need CUDA): a check that this runs.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .common import seconds
from .library import AdaptedViT, CapturedStep, GroupOptimizer, create_model, group_train_step

LEARNING_RATE = 1e-3
EAGER_WARMUP_STEPS = 3  # eager steps before the eager timing (allocations, cuBLAS workspaces)


def steps_per_second(step, steps: int, device: torch.device) -> float:
    def steps_in_a_row() -> None:
        for _ in range(steps):
            step()

    return steps / seconds(steps_in_a_row, device)


def group_batches(lead: AdaptedViT, runs: int, device: torch.device) -> list[tuple]:
    """One batch per run: an image's cached prefix, a mask, a label and unit text features."""
    generator = torch.Generator().manual_seed(0)
    size = lead.image_size
    batches = []
    for run in range(runs):
        images = torch.rand(1, 3, size, size, generator=generator).to(device)
        masks = (torch.rand(1, 1, size, size, generator=generator) > 0.8).float().to(device)
        text = F.normalize(torch.randn(lead.embed_dim, 2, generator=generator), dim=0).to(device)
        batches.append((images, masks, torch.tensor([float(run % 2)], device=device), text, torch.tensor([True]),
                        lead.encode_prefix(images)))
    return batches


def time_group(lead: AdaptedViT, runs: int, steps: int, device: torch.device) -> str:
    """The line of `runs` runs on `lead`'s backbone: eager and captured steps/s, and the recording's seconds."""
    models = [lead.sibling() for _ in range(runs)]
    batches = group_batches(lead, runs, device)
    capturable = device.type == "cuda"
    eager_opt = GroupOptimizer(models, [LEARNING_RATE] * runs, capturable=capturable)

    def eager() -> None:
        group_train_step(models, eager_opt, batches)

    for _ in range(EAGER_WARMUP_STEPS):
        eager()
    eager_rate = steps_per_second(eager, steps, device)
    line = f"{runs} run{'s' if runs > 1 else ''}, batch 1: eager {eager_rate:.1f} steps/s"
    if not capturable:
        return line + ", captured n/a (CUDA graphs need a CUDA device)"
    graphed_opt = GroupOptimizer(models, [LEARNING_RATE] * runs, capturable=True)
    captured = CapturedStep(models, graphed_opt)
    recording = seconds(lambda: captured(models, graphed_opt, batches), device)  # rehearsal, capture, first replay
    captured_rate = steps_per_second(lambda: captured(models, graphed_opt, batches), steps, device)
    return (f"{line}, captured {captured_rate:.1f} steps/s ({captured_rate / eager_rate:.2f}x; "
            f"recording {recording:.2f} s)")


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--stages", type=int, nargs="+", default=[6, 12, 18, 24])
    p.add_argument("--runs", type=int, nargs="+", default=[1, 6])
    p.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    lead = AdaptedViT(create_model(args.model, args.size), args.stages).to(device)
    print(f"{args.model} at {args.size} px, stages {' '.join(map(str, args.stages))}, fp32, {device}", flush=True)
    lines = []
    for runs in args.runs:
        lines.append(time_group(lead, runs, args.steps, device))
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
