"""`python -m mvfa.bench`: the flags, the sections in their order, the run (one table, one JSON file)
and the dispatch of the bench's own child processes (`--_child`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("bench")

import torch

from .auroc import section_auroc
from .children import run_script, write_peak_rss
from .common import Context, SkipSection
from .config import BenchConfig
from .forward import section_forward
from .library import bench_parser
from .memory import memory_child, section_memory
from .process import section_process
from .protocol import section_protocol
from .release import release_test_few
from .report import Row, device_info, format_table, write_json
from .startup import section_startup
from .together import section_reproduce
from .train_step import section_train_step

SECTION_FUNCTIONS = {
    "forward": section_forward,
    "train_step": section_train_step,
    "protocol": section_protocol,
    "auroc": section_auroc,
    "memory": section_memory,
    "startup": section_startup,
    "process": section_process,
    "reproduce": section_reproduce,
}
SECTIONS = tuple(SECTION_FUNCTIONS)


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


def child_main(kind: str, raw: str, json_path: str | None) -> int:
    """The child processes: a script run in-process (`script`: [path, *argv]), the release emulation,
    the memory measurement. The first two write their own peak RSS (VmHWM) to `json_path`."""
    args = json.loads(raw)
    if kind == "memory":
        return memory_child(BenchConfig.from_dict(args), json_path)
    if kind == "script":
        code = run_script(args)
    elif kind == "release_test_few":
        release_test_few(args)
        code = 0
    else:
        raise SystemExit(f"unknown child {kind!r}")
    write_peak_rss(json_path, code)
    return code


def run_section(name: str, ctx: Context) -> tuple[list[Row], str]:
    """A section's rows and status (ok, skipped, error); an error is printed and becomes its row."""
    try:
        return SECTION_FUNCTIONS[name](ctx), "ok"
    except SkipSection as skip:
        return [Row("skipped", str(skip))], "skipped"
    except Exception as err:  # one failing section must not lose the others' figures
        traceback.print_exc()
        message = (str(err).splitlines() or [""])[0][:200]
        return [Row("error", f"{type(err).__name__}: {message}")], "error"


def main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
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
            rows, status = run_section(name, ctx)
            failed = failed or status == "error"
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
