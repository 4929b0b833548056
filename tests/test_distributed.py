"""Several processes (torch.distributed, gloo on the CPU): the same results as one process, no hang on failure.

Ranks are started with torch.multiprocessing (the launcher's variables RANK, WORLD_SIZE, ... set by
hand, a free port per process group) or with torchrun itself; the model is the tiny random CLIP
and the data the synthetic benchmark with 9 test images (odd: uneven shards).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from CLIP import create_model
from dataset.synthetic import generate_benchmark
from mvfa import cli
from mvfa import reproduce
from mvfa.method.model import AdaptedViT
from mvfa.metrics import compute_metrics, pixel_auroc, sharded_pixel_metrics
from mvfa.runs.training import make_optimizers, train_step
from mvfa.runtime import distributed
from mvfa.runtime.distributed import SINGLE, Dist
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
N_TEST = (5, 4)  # 9 test images: 5 evaluation batches of 2, shared 2 / 3
EVAL_BATCH = "2"
FAILURE_BOUND_S = 240  # a failing rank must end the job well before any collective timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))


MAINS = {"test_few": cli.main_test_few, "test_zero": cli.main_test_zero, "train_few": cli.main_train_few,
         "train_zero": cli.main_train_zero, "reproduce": reproduce.main}


def _command_worker(rank: int, world: int, jobs: list[tuple[str, list[str], Path]], ports: list) -> None:
    """One rank: each job is a command line run as under torchrun, one after the other in this process,
    each with its own process group on its own port. Rank 0 picks a free port just before each job and
    hands it to the other ranks (`ports`: one queue per other rank)."""
    torch.set_num_threads(1)
    for name, argv, log in jobs:
        if rank == 0:
            port = free_port()
            for queue in ports:
                queue.put(port)
        else:
            port = ports[rank - 1].get()
        rank_env(rank, world, port)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = MAINS[name](argv)
        Path(f"{log}.rank{rank}").write_text(printed.getvalue())
        assert code == 0, f"rank {rank}: {name} exited {code}"


PORT_ATTEMPTS = 3  # a port found free can be taken (e.g. by a finished job's gloo sockets) before the group binds it


def run_ranks(jobs: list[tuple[str, list[str], Path]], world: int = WORLD) -> None:
    """Run the jobs one after the other on `world` ranks spawned once (a spawn costs each rank the
    imports of torch and mvfa); each rank's printout goes to <log>.rank<r>.

    Each job gets its port just before it starts. If a port was taken in between (EADDRINUSE, a
    property of the test machine, not of the code: the group's start fails before the job writes
    anything), the ranks are spawned again for the jobs that some rank has not finished.
    """
    context = mp.get_context("spawn")
    for attempt in range(PORT_ATTEMPTS):
        left = [job for job in jobs if not all(Path(f"{job[2]}.rank{r}").exists() for r in range(world))]
        ports = [context.SimpleQueue() for _ in range(world - 1)]
        try:
            mp.spawn(_command_worker, args=(world, left, ports), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                raise


def spawn_on_free_port(start) -> None:
    """`start(port)` with a free port, again with a new one if the port was taken meanwhile."""
    for attempt in range(PORT_ATTEMPTS):
        try:
            start(free_port())
            return
        except mp.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                raise


def run_single(name: str, argv: list[str]) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks use one thread each: the same arithmetic
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert MAINS[name](argv) == 0
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def write_adapters(clip: Path, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE, pretrained=str(clip)), [int(s) for s in TINY_STAGES])
    torch.save(model.adapter_state(), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    generate_benchmark(root / "data", seed=3, image_size=48, n_valid=(3, 3), n_test=N_TEST, datasets=["Brain", "Chest"])
    clip = tiny_clip  # conftest.py
    return {"root": root, "data": root / "data", "clip": clip,
            "few": write_adapters(clip, root / "few.pth", 1), "zero": write_adapters(clip, root / "zero.pth", 2)}


def outputs(folder: Path) -> dict:
    """What must not depend on the number of ranks: metrics, predictions, overlays (not the run time)."""
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    metrics.pop("seconds")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "maps").glob("*"))}
    return {"metrics": metrics, "predictions": (folder / "predictions.csv").read_bytes(), "maps": files}


# ------------------------------------------------------------------------------------------------
# Sharded evaluation = one process, to the last digit


def test_sharded_evaluation_equals_one_process(bench, tmp_path):
    def argv(obj: str, checkpoint: Path | None, out: Path, *extra: str) -> list[str]:
        chosen = ("--checkpoint", str(checkpoint)) if checkpoint else ()
        return tiny_argv(bench["data"], bench["clip"], out, out, obj, *chosen, "--eval_batch_size", EVAL_BATCH, *extra)

    cases = {
        # training without --ddp: every rank trains the release's batches; selection and calibration sharded
        "train_few": ("train_few", "Brain", None, ("--shot", "1", "--epoch", "2")),
        "few_masks": ("test_few", "Brain", bench["few"], ("--shot", "1", "--save_maps", "2")),  # fused maps, AUPRO
        "few_no_masks": ("test_few", "Chest", bench["few"], ("--shot", "1", "--save_maps")),  # fused scores, det maps
        "zero_no_masks": ("test_zero", "Chest", bench["zero"], ()),
        "zero_valid": ("test_zero", "Brain", bench["zero"], ("--normalize", "valid")),  # fixed statistics, fitted sharded
    }
    for key, (name, obj, checkpoint, extra) in cases.items():
        run_single(name, argv(obj, checkpoint, tmp_path / "one" / key, *extra))
    run_ranks([(name, argv(obj, checkpoint, tmp_path / "two" / key, *extra), tmp_path / f"{key}.log")
               for key, (name, obj, checkpoint, extra) in cases.items()])
    for key in cases:
        one, two = outputs(tmp_path / "one" / key), outputs(tmp_path / "two" / key)
        assert two == one, key
        assert (tmp_path / f"{key}.log.rank1").read_text() == ""  # only rank 0 prints
    one, two = tmp_path / "one" / "train_few", tmp_path / "two" / "train_few"
    assert (two / "train_log.csv").read_bytes() == (one / "train_log.csv").read_bytes()
    trained = [torch.load(folder / "Brain-1shot-it0-seed111.pth", weights_only=True) for folder in (one, two)]
    assert trained[0]["meta"] == trained[1]["meta"]  # the calibrated statistics and threshold too
    for group in ("seg_adapters", "det_adapters"):
        assert all(torch.equal(trained[0][group][k], trained[1][group][k]) for k in trained[0][group])
    assert len(outputs(tmp_path / "one" / "few_masks")["maps"]) == 5  # 2 highest, 2 lowest, index.csv
    assert "pixel_aupro" in outputs(tmp_path / "one" / "few_masks")["metrics"]


# ------------------------------------------------------------------------------------------------
# --ddp: a step of two ranks = one step on the concatenated batch


def _step_batches(clip: Path) -> tuple[AdaptedViT, list[tuple]]:
    """The model and two global batches: 3 images (ranks 2 + 1; one without masks), then 1 (ranks 1 + 0)."""
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE, pretrained=str(clip)), [int(s) for s in TINY_STAGES])
    generator = torch.Generator().manual_seed(5)
    text = torch.nn.functional.normalize(torch.randn(model.visual.proj.shape[1], 2, generator=generator), dim=0)
    batches = []
    for count in (3, 1):
        images = torch.rand(count, 3, TINY_SIZE, TINY_SIZE, generator=generator)
        masks = (torch.rand(count, 1, TINY_SIZE, TINY_SIZE, generator=generator) > 0.7).float()
        labels = torch.tensor([1.0, 0.0, 1.0][:count])
        has_masks = torch.tensor([True, False, True][:count])
        batches.append((images, masks, labels, text, has_masks))
    return model, batches


RANK_PARTS = {3: (slice(0, 2), slice(2, 3)), 1: (slice(0, 1), slice(1, 1))}  # global batch size -> each rank's images


def _ddp_step_worker(rank: int, port: int, clip: Path, out: Path) -> None:
    torch.set_num_threads(1)
    rank_env(rank, WORLD, port)
    with distributed.process_group("cpu") as (dist, _):
        model, batches = _step_batches(clip)
        optimizers = make_optimizers(model, 1e-4)
        losses = []
        for images, masks, labels, text, has_masks in batches:
            mine = RANK_PARTS[len(images)][rank]
            part = (images[mine], masks[mine], labels[mine], text, has_masks[mine])
            losses.append(train_step(model, optimizers, *part, dist=dist).total.item())
        torch.save({"adapters": model.adapter_state(), "losses": losses}, out / f"rank{rank}.pt")


def test_ddp_step_equals_one_step_on_the_concatenated_batch(bench, tmp_path):
    spawn_on_free_port(lambda port: mp.spawn(_ddp_step_worker, args=(port, bench["clip"], tmp_path), nprocs=WORLD, join=True))
    model, batches = _step_batches(bench["clip"])
    optimizers = make_optimizers(model, 1e-4)
    losses = [train_step(model, optimizers, *batch).total.item() for batch in batches]
    expected = model.adapter_state()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["losses"] == pytest.approx(losses, rel=1e-6)
        for group in expected:
            for key, value in expected[group].items():
                torch.testing.assert_close(got["adapters"][group][key], value, atol=1e-6, rtol=0)
    initial, _ = _step_batches(bench["clip"])
    moved = initial.adapter_state()["seg_adapters"]
    assert any(not torch.equal(moved[k], expected["seg_adapters"][k]) for k in moved)  # the seg adapters stepped


def test_train_zero_ddp_states_the_effective_batch(bench, tmp_path):
    """train_zero --ddp on 2 ranks x batch 1 follows a single process's batches of 2 (same shuffle)."""
    def argv(out: str, *extra: str) -> list[str]:
        return tiny_argv(bench["data"], bench["clip"], tmp_path / out, tmp_path / out, "Chest", "--epoch", "1",
                         "--select", "last", "--threshold_rule", "none", "--eval_batch_size", EVAL_BATCH, *extra)

    run_single("train_zero", argv("one", "--batch_size", "2"))
    run_ranks([("train_zero", argv("two", "--batch_size", "1", "--ddp"), tmp_path / "ddp.log")])
    printed = (tmp_path / "ddp.log.rank0").read_text()
    assert "data-parallel (--ddp): 2 ranks x --batch_size 1 = effective batch 2 images per step" in printed
    config = json.loads((tmp_path / "two" / "metrics.json").read_text())["config"]
    assert config["ddp"] is True and config["effective_batch_size"] == 2 and config["world_size"] == 2
    one = torch.load(tmp_path / "one" / "Chest-zero-seed111.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "Chest-zero-seed111.pth", weights_only=True)
    for group in ("seg_adapters", "det_adapters"):
        for key in one[group]:
            torch.testing.assert_close(two[group][key], one[group][key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# reproduce: runs side by side, every row, the table once


def test_reproduce_on_two_ranks(bench, tmp_path):
    out = tmp_path / "out"
    argv = ["--data_path", str(bench["data"]), "--output_dir", str(out), "--model_name", TINY_MODEL,
            "--clip_ckpt", str(bench["clip"]), "--img_size", str(TINY_SIZE), "--features_list", *TINY_STAGES,
            "--device", "cpu", "--shots", "1", "--splits", "1", "--epoch", "1", "--batch_size", "8",
            "--protocols", "release", "--only_normal"]
    run_ranks([("reproduce", argv, tmp_path / "first.log"), ("reproduce", argv, tmp_path / "again.log")])
    rows = (out / "results.csv").read_text().splitlines()[1:]
    # per dataset: zero-shot, 1-shot and 1-shot normal-only, one split, one protocol
    assert len(rows) == 6 and len(list((out / "runs").glob("*/*/*/split0/metrics.json"))) == 6
    first = (tmp_path / "first.log.rank0").read_text()
    assert first.count("| average |") == 1 and "6 runs made, 0 reused" in first
    assert (tmp_path / "first.log.rank1").read_text() == ""
    assert "0 runs made, 6 reused" in (tmp_path / "again.log.rank0").read_text()  # resume: nothing is redone
    assert "| average |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------
# A failing rank ends the job (torchrun), with its error, without a hang

DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import os
from mvfa import cli
from mvfa.method import evaluation
from mvfa.runtime.errors import MVFAError

if os.environ["RANK"] == "1":
    def failing(*args, **kwargs):
        raise MVFAError("injected failure on rank 1")
    evaluation.raw_batches = failing
sys.exit(cli.main_test_zero(sys.argv[1:]))
"""


def test_failing_rank_stops_the_job(bench, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    argv = tiny_argv(bench["data"], bench["clip"], tmp_path, tmp_path / "out", "Chest", "--checkpoint", str(bench["zero"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
         str(free_port()), str(driver), *argv],
        capture_output=True, text=True, env=env, timeout=FAILURE_BOUND_S, cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "[rank 1] error: injected failure on rank 1" in done.stderr
    assert time.monotonic() - started < FAILURE_BOUND_S
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# Single process: nothing changes; the pieces


def test_single_process_starts_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group(None) as (dist, device):
        assert dist == SINGLE and device is None and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.process_group("cpu") as (dist, device):
        assert dist == SINGLE and device == "cpu" and not torch.distributed.is_initialized()
    assert not any(a.dest == "ddp" for a in cli.build_parser("few-shot", True)._actions)
    assert cli.build_parser("zero-shot", True).parse_args([]).ddp is False


def test_batch_shards_cover_every_image_once():
    for count, batch, world in [(9, 2, 2), (9, 8, 2), (1, 8, 3), (16, 8, 2), (17, 4, 3), (5, 1, 8)]:
        shards = [Dist(r, world).batch_shard(count, batch) for r in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        assert all(start % batch == 0 or start == count for start, _ in shards)
    assert SINGLE.batch_shard(9, 2) == (0, 9)


class _ThreadRanks:
    """The collective operations of mvfa.metrics between threads (one per 'rank')."""

    def __init__(self, shared: dict, rank: int) -> None:
        self.shared, self.rank, self.is_main = shared, rank, rank == 0

    def _exchange(self, value) -> list:
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        barrier.wait()
        slots[self.rank] = value
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def all_gather_cat(self, array):
        return np.concatenate(self._exchange(array))

    def gather_cat(self, array):
        out = np.concatenate(self._exchange(array))
        return out if self.is_main else None

    def all_sum(self, array):
        return np.sum(np.stack(self._exchange(np.asarray(array, dtype=np.int64))), axis=0)

    def all_min(self, value):
        return min(self._exchange(value))

    def all_max(self, value):
        return max(self._exchange(value))

    def broadcast(self, value):
        return self._exchange(value)[0]


@pytest.mark.parametrize("ties", [False, True])
def test_sharded_pixel_metrics_are_exact(ties):
    rng = np.random.default_rng(0)
    maps = rng.random((7, 20, 20)).astype(np.float32) - 0.5
    if ties:
        maps = (np.round(maps * 16) / 16).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[1, 3:9, 4:10] = masks[4, 10:18, 10:12] = masks[4, 1:3, 1:3] = masks[6, :5, :5] = True
    expected = compute_metrics(np.arange(7.0), np.array([0, 1, 0, 0, 1, 0, 1]), maps, masks)
    for bounds in ([(0, 3), (3, 7)], [(0, 0), (0, 7)], [(0, 2), (2, 2), (2, 5), (5, 7)]):
        for full in (True, False):
            shared = {"barrier": threading.Barrier(len(bounds)), "slots": [None] * len(bounds)}
            results = [None] * len(bounds)

            def work(rank: int) -> None:
                start, stop = bounds[rank]
                results[rank] = sharded_pixel_metrics(maps[start:stop], masks[start:stop], _ThreadRanks(shared, rank), full)

            threads = [threading.Thread(target=work, args=(r,)) for r in range(len(bounds))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for result in results:
                if full:
                    assert result == {k: v for k, v in expected.items() if k.startswith("pixel_")}
                else:
                    assert result == {"pixel_auroc": pixel_auroc(maps, masks)}
