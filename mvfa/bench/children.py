"""Child processes of the bench (`python -m mvfa.bench --_child KIND`): their environment, running
them, and what a child reports back (a JSON file: its result, or its exit code and own peak RSS)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import BenchConfig
from .library import write_text_atomic
from .peak_memory import status_kib

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(cfg: BenchConfig, **extra: str) -> dict:
    """This environment, with the repository on PYTHONPATH (children run `-m mvfa.bench`, test_few.py)
    and the run's thread count."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    threads = {"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {}
    return {**os.environ, "PYTHONPATH": path, **threads, **extra}


def child_command(kind: str, args) -> list[str]:
    return [sys.executable, "-m", "mvfa.bench", "--_child", kind, "--_child_args", json.dumps(args)]


def run_child(kind: str, cfg: BenchConfig, **env: str) -> dict:
    """Run a child given the run's configuration and return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="mvfa-bench-child-") as folder:
        result = Path(folder) / "result.json"
        command = [*child_command(kind, dataclasses.asdict(cfg)), "--json", str(result)]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=child_env(cfg, **env))
        if done.returncode != 0:
            raise RuntimeError(f"child {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(result.read_text())


def run_measured(command: list[str], log: Path, env: dict) -> dict:
    """Run `python -m mvfa.bench --_child ...` to completion: wall seconds and the child's own peak RSS.

    The child reports its VmHWM itself: the rusage of a child started from a large parent (vfork,
    then exec) counts the parent's resident memory too."""
    report = log.with_suffix(".json")
    start = time.perf_counter()
    done = subprocess.run([*command, "--json", str(report)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
    wall = time.perf_counter() - start
    write_text_atomic(log, done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} ... exited with {done.returncode}:\n{done.stdout[-2000:]}")
    return {"wall_s": wall, "maxrss_bytes": json.loads(report.read_text())["peak_rss_bytes"], "output": done.stdout}


def run_script(argv: list[str]) -> int:
    """A repository script run in this process as `python <argv[0]> <argv[1:]>`; its exit code."""
    import runpy

    sys.argv = list(argv)
    sys.path.insert(0, str(REPO_ROOT))
    try:
        runpy.run_path(str(REPO_ROOT / argv[0]), run_name="__main__")
        return 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)


def write_json_result(path: str, result: dict) -> None:
    write_text_atomic(path, json.dumps(result))


def write_peak_rss(path: str | None, code: int) -> None:
    """A measured child's report: its exit code and its own peak RSS (VmHWM)."""
    if path:
        write_json_result(path, {"exit": code, "peak_rss_bytes": status_kib("VmHWM") * 1024})
