"""Speed and memory benchmark of the toolkit: one table, one JSON file. Outside the library: nothing
in mvfa, dataset, CLIP or the scripts imports this package.

    python -m mvfa.bench                         # every section, default sizes, on CUDA when present
    python -m mvfa.bench --smoke                 # ViT-Tiny-14 and a few images: seconds
    python -m mvfa.bench --only forward,auroc --json bench.json
    python -m mvfa.bench --device cuda --full_protocol --json bench.json
    python -m mvfa.bench.metrics --n 200000000   # pixel AUROC alone, against scikit-learn

The default model is the real ViT-L-14-336 architecture at 240 px with RANDOM weights (speed and
memory do not depend on the weights' values). The table holds measured figures and ratios of figures;
both sides of a ratio are measured side by side in the same run (machines are noisy, shared CPUs more so).

Sections (``--only``, comma separated), one module each:

forward     FLOPs per image (analytic, checked with torch's FlopCounterMode); CPU: FLOP/s of the
            adapted ViT at the best batch size against a large fp32 matrix product; CUDA: images/s
            with autocast fp16 and bf16 over batch sizes, and an 8192^3 bf16 matrix product.
train_step  mvfa.runs.training.train_step at batch 1 (both losses, a mask) against an emulation of the
            release's step (every CLIP weight requires grad, the whole forward under autograd).
protocol    per-image costs of the few-shot protocol's parts through the real code paths
            (the runs' training loop, build_memory_bank, evaluate), extrapolated to the release's
            4-shot Brain protocol and to the zero-shot protocol.
auroc       mvfa.metrics.pixel_auroc against sklearn's roc_auc_score (mvfa.bench.metrics).
memory      peak memory of evaluate beyond the fused maps; peak of a memory-bank search vs Q x B.
startup     text features of the 420 prompts: all 77 positions (the release) vs the trimmed context
            the model uses, and the on-disk text-feature cache.
process     test_few.py as a whole process on CPU (wall time, peak RSS) against a release
            emulation of the same work, both as subprocesses.
reproduce   python -m mvfa.reproduce on the tiny backbone (2 datasets x 4 splits x both protocols):
            each protocol's run alone (--one_by_one) against the protocols trained together and
            against the default (runs grouped in lockstep), at 2 epochs, and one by one and grouped
            at 4: each way's cost per further epoch (module together.py).

The other modules: __main__ (flags, the sections' order, the run), config (sizes), common (the run's
context, timing, random inputs), report (rows, table, JSON), release (the release emulated),
peak_memory, children (the bench's child processes), library (the toolkit names the bench uses), and
graph_step (`python -m mvfa.bench.graph_step`, on its own: eager against CUDA-graph training steps/s).
"""
from __future__ import annotations

from mvfa.parsers import bench_parser as build_parser


def main(argv: list[str] | None = None) -> int:
    """The `mvfa bench` entry (mvfa.commands): the run of `python -m mvfa.bench`, imported on first use
    so that importing this package stays light (no torch)."""
    from .__main__ import main as run

    return run(argv)


__all__ = ["build_parser", "main"]
