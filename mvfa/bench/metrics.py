"""Benchmark: exact pixel AUROC (mvfa.metrics.pixel_auroc) against sklearn's roc_auc_score.

    python -m mvfa.bench.metrics --n 200000000            # default: 200 million float32 scores
    python -m mvfa.bench.metrics --n 20000000 --json bench.json
    python -m mvfa.bench.metrics --n 200000000 --sklearn_n 20000000   # sklearn on a prefix
    python -m mvfa.bench.metrics --device cuda            # torch tensors on the GPU

Data: float32 scores uniform in [0, 1), ~5% positives (``--pos_rate``) whose scores are shifted up
by 0.25; float32 uniform values come on a grid of 2^-24, so at these sizes there are many ties.
sklearn runs on the first ``--sklearn_n`` samples (default: all of them; the samples are
independent, so a prefix is a random subsample); where that is fewer than ``--n``, pixel_auroc is
timed on the same prefix too, so that the speed-up compares equal work. Peak extra memory of
pixel_auroc is measured with tracemalloc, which sees numpy's allocations (a separate, untimed
call), and, for CUDA, with torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import tracemalloc

import numpy as np

# the toolkit names this module uses (it runs alone, without the rest of mvfa.bench)
from mvfa.metrics import pixel_auroc, pixel_metrics
from mvfa.runtime.files import write_text_atomic

_GEN_CHUNK = 1 << 22


def make_data(n: int, pos_rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores and bool labels, generated in chunks (no full-size temporaries)."""
    rng = np.random.default_rng(seed)
    scores = np.empty(n, dtype=np.float32)
    labels = np.empty(n, dtype=bool)
    for i in range(0, n, _GEN_CHUNK):
        k = min(_GEN_CHUNK, n - i)
        y = rng.random(k, dtype=np.float32) < pos_rate
        s = rng.random(k, dtype=np.float32)
        s[y] += np.float32(0.25)
        scores[i:i + k] = s
        labels[i:i + k] = y
    return scores, labels


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timed(fn, repeat: int, sync=None):
    """Best wall-clock seconds over ``repeat`` calls, the CPU seconds of that call, the value."""
    best, best_cpu, value = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        value = fn()
        if sync is not None:
            sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, value


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f} GB"


def run(args: argparse.Namespace) -> dict:
    res: dict = {
        "n": args.n, "pos_rate": args.pos_rate, "seed": args.seed, "device": args.device,
        "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPU cores",
    }
    t0 = time.perf_counter()
    scores, labels = make_data(args.n, args.pos_rate, args.seed)
    res["gen_s"] = time.perf_counter() - t0
    res["scores_bytes"] = int(scores.nbytes)
    res["n_pos"] = int(np.count_nonzero(labels))
    sk_n = args.n if args.sklearn_n is None else min(args.sklearn_n, args.n)
    res["sklearn_n"] = None if args.skip_sklearn else sk_n
    rows = []  # (what, n, seconds, value, extra)

    if args.device == "cuda":
        import torch

        sync = torch.cuda.synchronize
        st = torch.from_numpy(scores).cuda()
        yt = torch.from_numpy(labels).cuda()
        pixel_auroc(st[:1000], yt[:1000]) if res["n_pos"] else None  # warm-up (CUDA context, kernels)
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t, c, val = _timed(lambda: pixel_auroc(st, yt), args.repeat, sync)
        res["pixel_auroc_s"], res["pixel_auroc_cpu_s"], res["pixel_auroc"] = t, c, val
        res["pixel_auroc_peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        res["peak_extra_source"] = "torch.cuda.max_memory_allocated"
        rows.append(("pixel_auroc (cuda)", args.n, t, c, val))
        if sk_n < args.n and not args.skip_sklearn:
            t2, c2, v2 = _timed(lambda: pixel_auroc(st[:sk_n], yt[:sk_n]), args.repeat, sync)
            res["pixel_auroc_sub_s"], res["pixel_auroc_sub_cpu_s"], res["pixel_auroc_sub"] = t2, c2, v2
            rows.append(("pixel_auroc (cuda)", sk_n, t2, c2, v2))
        del st, yt
    else:
        rss0 = _maxrss_bytes()
        t, c, val = _timed(lambda: pixel_auroc(scores, labels), args.repeat)
        res["pixel_auroc_s"], res["pixel_auroc_cpu_s"], res["pixel_auroc"] = t, c, val
        res["maxrss_delta_bytes"] = max(0, _maxrss_bytes() - rss0)
        rows.append(("pixel_auroc", args.n, t, c, val))
        if args.with_ap_f1:
            t3, c3, pm = _timed(lambda: pixel_metrics(scores, labels), 1)
            res["pixel_metrics_s"], res["pixel_metrics_cpu_s"], res["pixel_metrics"] = t3, c3, pm
            rows.append(("pixel_metrics (auroc+ap+f1)", args.n, t3, c3, pm["auroc"]))
        if sk_n < args.n and not args.skip_sklearn:
            t2, c2, v2 = _timed(lambda: pixel_auroc(scores[:sk_n], labels[:sk_n]), args.repeat)
            res["pixel_auroc_sub_s"], res["pixel_auroc_sub_cpu_s"], res["pixel_auroc_sub"] = t2, c2, v2
            rows.append(("pixel_auroc", sk_n, t2, c2, v2))
        # peak memory, untimed: tracemalloc sees numpy's buffers
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            pixel_auroc(scores, labels)
            res["pixel_auroc_peak_extra_bytes"] = int(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
        res["peak_extra_source"] = "tracemalloc"

    if not args.skip_sklearn:
        from sklearn.metrics import roc_auc_score

        rss1 = _maxrss_bytes()
        t_sk, c_sk, v_sk = _timed(lambda: roc_auc_score(labels[:sk_n], scores[:sk_n]), 1)
        res["sklearn_s"], res["sklearn_cpu_s"], res["sklearn_auroc"] = t_sk, c_sk, float(v_sk)
        res["sklearn_maxrss_growth_bytes"] = max(0, _maxrss_bytes() - rss1)
        rows.append(("sklearn roc_auc_score", sk_n, t_sk, c_sk, float(v_sk)))
        key = "pixel_auroc" if sk_n == args.n else "pixel_auroc_sub"
        res["abs_diff"] = abs(res[key] - float(v_sk))
        res["speedup_same_data"] = t_sk / res[key + "_s"]
        res["speedup_cpu_time_same_data"] = c_sk / res[key + "_cpu_s"]

    # table
    print(f"machine: {res['machine']}; device: {args.device}")
    print(f"data: {args.n:,} float32 scores, {res['n_pos']:,} positives, "
          f"{_gb(res['scores_bytes'])} of scores (generated in {res['gen_s']:.1f} s)")
    print(f"{'what':<30}{'n':>14}{'wall s':>9}{'CPU s':>9}{'value':>20}")
    for what, n, t, c, v in rows:
        print(f"{what:<30}{n:>14,}{t:>9.2f}{c:>9.2f}{v:>20.15f}")
    peak = res["pixel_auroc_peak_extra_bytes"]
    print(f"pixel_auroc peak extra memory ({res['peak_extra_source']}): {_gb(peak)} "
          f"= {peak / res['scores_bytes']:.2f} x the scores' size")
    if "maxrss_delta_bytes" in res:
        print(f"pixel_auroc process max-RSS growth: {_gb(res['maxrss_delta_bytes'])}")
    if "sklearn_s" in res:
        print(f"sklearn max-RSS growth beyond that: {_gb(res['sklearn_maxrss_growth_bytes'])}")
        print(f"speed-up on the same {sk_n:,} samples: {res['speedup_same_data']:.1f}x wall-clock, "
              f"{res['speedup_cpu_time_same_data']:.1f}x in CPU time; "
              f"|difference| = {res['abs_diff']:.3g}")
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000_000, help="number of scores (default 2e8)")
    p.add_argument("--sklearn_n", type=int, default=None,
                   help="run sklearn on the first this many samples (default: all of them)")
    p.add_argument("--skip_sklearn", action="store_true", help="do not run sklearn at all")
    p.add_argument("--pos_rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="time pixel_auroc this many times, keep the best")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: numpy arrays; cuda: torch tensors on the GPU")
    p.add_argument("--with_ap_f1", action="store_true",
                   help="also time pixel_metrics (AUROC + AP + F1-max from one sort), CPU only")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
