"""The four scripts guard the user's results (issue #17): a test run refuses adapters trained for other
settings, a training run keeps an earlier checkpoint made with other settings (unless --overwrite),
output places and bad numbers are refused before any model is built, a diverged run keeps its last
good selection, two runs never share an --output_dir, and a worker's error or Ctrl-C ends in one line.

Each refusal: one stderr line `error: ...` naming the file or flag and what to do, exit code 2, no
traceback, nothing written, earlier results intact. Tiny random CLIP, small synthetic data."""
from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys

from PIL import Image
import pytest
import torch

from CLIP import create_model
from dataset.synthetic import generate_benchmark
from mvfa import cli
from mvfa.method.model import AdaptedViT, read_checkpoint, save_checkpoint
from mvfa.runs import run as runs
from mvfa.runs import training
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import LOCK_NAME, folder_lock
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

CHECKPOINT = "Brain-1shot-it0-seed111.pth"
TRAINING = ("--shot", "1", "--epoch", "1", "--batch_size", "11")  # 22 augmented support images: 2 steps an epoch
READ_ONLY = 0o555


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    """Brain and Liver (zero-shot needs two), and a Brain few-shot checkpoint trained for 1 epoch with its outputs."""
    root = tmp_path_factory.mktemp("safety")
    generate_benchmark(root / "data", seed=1, image_size=64, n_valid=(4, 4), n_test=(3, 3), datasets=["Brain", "Liver"])
    clip = tiny_clip  # conftest.py
    argv = tiny_argv(root / "data", clip, root / "ckpt", root / "out", "Brain", *TRAINING)
    assert cli.main_train_few(argv) == 0
    return {"data": root / "data", "clip": clip, "ckpt": root / "ckpt" / CHECKPOINT, "out": root / "out"}


def argv(bench: dict, tmp_path: Path, *extra: str, save: Path | None = None, out: Path | None = None) -> list[str]:
    return tiny_argv(bench["data"], bench["clip"], save or tmp_path / "ckpt", out or tmp_path / "out", "Brain", *extra)


def trained_copy(bench: dict, tmp_path: Path, **meta) -> Path:
    """The trained checkpoint in <tmp_path>/ckpt under its name, its metadata updated (None removes a key)."""
    state = read_checkpoint(bench["ckpt"])
    state["meta"] = {k: v for k, v in {**state["meta"], **meta}.items() if v is not None}
    path = tmp_path / "ckpt" / CHECKPOINT
    save_checkpoint(state, path)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: a refusal must come before any model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(runs, "build_adapted_model", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Temporary files and the run lock: none may stay after a run, however it ended."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_NAME]


# ---------------------------------------------------------------------------------------------
# 1. A test run checks the checkpoint's metadata before scoring


META_CASES = {
    "img_size": (["--img_size", "42"], "--img_size 42 (checkpoint: 56)"),
    "features_list": (["--features_list", "2", "4", "6"], "--features_list 2 4 6 (checkpoint: 2 4 6 8)"),
    "quick_gelu": (["--quick_gelu"], "--quick_gelu on (checkpoint: off)"),
    "model_name": (["--model_name", "ViT-B-32"], "--model_name ViT-B-32 (checkpoint: ViT-Tiny-14)"),
    "prompt_name": (["--prompt_name", "head MRI"], "--prompt_name head MRI (checkpoint: Brain)"),
    "pretrain": (["--pretrain", "none"], "--pretrain none (checkpoint: openai)"),
    "obj": (["--obj", "Liver"], "--obj Liver (checkpoint: Brain)"),
    "only_normal": (["--only_normal", "--zero_shot_ckpt", "CKPT"], "--zero_shot_ckpt needs a zero-shot checkpoint (this one is few-shot)"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_test_few_refuses_adapters_trained_for_other_settings(bench, tmp_path, capsys, no_model, case):
    flags, expected = META_CASES[case]
    flags = [str(bench["ckpt"]) if flag == "CKPT" else flag for flag in flags]
    explicit = [] if case == "only_normal" else ["--checkpoint", str(bench["ckpt"])]
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", *explicit, *flags)) == 2
    line = one_error_line(capsys)
    assert str(bench["ckpt"]) in line and expected in line and "pass the checkpoint's values" in line, line
    assert not (tmp_path / "out").exists()


def test_every_mismatch_is_named_in_one_line(bench, tmp_path, capsys, no_model):
    flags = ["--img_size", "42", "--features_list", "2", "4"]
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--save_path", str(bench["ckpt"].parent), *flags)) == 2
    line = one_error_line(capsys)
    assert "--img_size 42 (checkpoint: 56); --features_list 2 4 (checkpoint: 2 4 6 8)" in line, line


def test_test_zero_refuses_a_few_shot_checkpoint(bench, tmp_path, capsys, no_model):
    flags = tiny_argv(bench["data"], bench["clip"], tmp_path / "ckpt", tmp_path / "out", "Brain", "--checkpoint", str(bench["ckpt"]))
    assert cli.main_test_zero(flags) == 2
    assert "a zero-shot test needs a zero-shot checkpoint (this one is few-shot: test it with test_few.py)" in one_error_line(capsys)


def test_checkpoints_without_metadata_or_untrained_are_accepted_with_a_note(bench, tmp_path, capsys):
    release = tmp_path / "release.pth"
    state = read_checkpoint(bench["ckpt"])
    save_checkpoint({group: state[group] for group in ("seg_adapters", "det_adapters")}, release)
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--checkpoint", str(release))) == 0
    assert f"note: {release} has no metadata (a release checkpoint?)" in capsys.readouterr().out

    untrained = trained_copy(bench, tmp_path, trained=False, epoch=0)
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", out=tmp_path / "out2")) == 0
    assert f"note: {untrained} holds untrained adapters (trained with --epoch 0)" in capsys.readouterr().out


def test_only_normal_takes_a_zero_shot_checkpoint_of_its_object(bench, tmp_path, capsys):
    zero = trained_copy(bench, tmp_path, mode="zero-shot", shot=0, iterate=-1)
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--only_normal", "--zero_shot_ckpt", str(zero))) == 0
    assert "Brain AUC : " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. Lost work: an earlier checkpoint of the same name, output places


@pytest.mark.parametrize("flags, expected", [
    (["--epoch", "2"], "--epoch 2 (checkpoint: 1)"),
    (["--learning_rate", "0.01"], "--learning_rate 0.01 (checkpoint: 0.001)"),
    (["--select", "last"], "--select last (checkpoint: test)"),
    (["--epoch", "0"], "trained adapters would be replaced by untrained ones; --epoch 0 (checkpoint: 1)"),
])
def test_training_keeps_a_checkpoint_made_with_other_settings(bench, tmp_path, capsys, no_model, flags, expected):
    path = trained_copy(bench, tmp_path)
    before = path.read_bytes()
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, *flags)) == 2
    line = one_error_line(capsys)
    assert f"{path} holds adapters made with other settings: {expected}" in line and "pass --overwrite" in line, line
    assert path.read_bytes() == before and not (tmp_path / "out").exists()


def test_untrained_adapters_replace_trained_ones_only_with_overwrite(bench, tmp_path, capsys):
    path = trained_copy(bench, tmp_path)
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, "--epoch", "0", "--overwrite")) == 0
    printed = capsys.readouterr().out
    assert "note: --epoch 0: the adapters are not trained" in printed
    assert f"note: --overwrite: this run replaces {path} (trained adapters would be replaced by untrained ones" in printed
    assert f"saved untrained (--epoch 0) adapters to {path}" in printed
    meta = read_checkpoint(path)["meta"]
    assert meta["trained"] is False and meta["epoch"] == 0


def test_the_same_settings_are_a_re_run(bench, tmp_path, capsys):
    path = trained_copy(bench, tmp_path)
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING)) == 0
    assert f"note: {path} exists, made with the same settings: this run replaces it (a re-run)" in capsys.readouterr().out
    assert read_checkpoint(path)["meta"]["trained"] is True


def test_an_unreadable_checkpoint_in_the_way_needs_overwrite(bench, tmp_path, capsys, no_model):
    path = tmp_path / "ckpt" / CHECKPOINT
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "not a readable adapter checkpoint" in line and "pass --overwrite" in line, line
    assert path.read_bytes() == b"not a checkpoint"


def make_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("in the way")
    return path


def make_read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(READ_ONLY)
    return path


# case -> (prepare tmp_path, the words of the error line)
OUTPUT_CASES = {
    "output_dir is a file": (lambda t: make_file(t / "out"), "--output_dir {t}/out is a file, not a folder"),
    "save_path is a file": (lambda t: make_file(t / "ckpt"), "--save_path {t}/ckpt is a file, not a folder"),
    "save_path below a file": (lambda t: make_file(t / "ckpt"), "is a file"),
    "read-only output_dir": (lambda t: make_read_only(t / "out"), "--output_dir {t}/out is read-only"),
    "read-only above save_path": (lambda t: make_read_only(t / "ro"),
                                  "--save_path {t}/ro/ckpt cannot be made: {t}/ro is read-only"),
    "checkpoint is a folder": (lambda t: (t / "ckpt" / CHECKPOINT).mkdir(parents=True),
                               f"{{t}}/ckpt/{CHECKPOINT} is not a file"),
    "metrics.json is a folder": (lambda t: (t / "out" / "metrics.json").mkdir(parents=True),
                                 "{t}/out/metrics.json is not a file"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_output_places_are_checked_before_any_work(bench, tmp_path, capsys, no_model, case):
    """Even as root (who may write anywhere), a folder whose write bits are cleared counts as read-only."""
    prepare, expected = OUTPUT_CASES[case]
    prepare(tmp_path)
    save = tmp_path / "ro" / "ckpt" if case == "read-only above save_path" else tmp_path / "ckpt"
    if case == "save_path below a file":
        save = tmp_path / "ckpt" / "below"
    try:
        assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, save=save)) == 2
        line = one_error_line(capsys)
        assert expected.format(t=tmp_path) in line, line
    finally:
        for folder in (tmp_path / "out", tmp_path / "ro"):
            if folder.is_dir():
                folder.chmod(0o755)
    assert not (tmp_path / "out" / "predictions.csv").exists()


# ---------------------------------------------------------------------------------------------
# 3. Divergence


@pytest.fixture
def nan_at_step(monkeypatch):
    """The loss of training step `n` (counted over the run, from 1) is NaN, and so its gradients."""
    def install(n: int) -> None:
        real = training.compute_loss
        calls = []

        def poisoned(*args, **kwargs):
            parts = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == n:
                parts.total = parts.total * float("nan")
            return parts

        monkeypatch.setattr(training, "compute_loss", poisoned)

    return install


def test_a_diverged_run_keeps_its_last_good_selection(bench, tmp_path, capsys, nan_at_step):
    nan_at_step(3)  # epoch 2, its first step
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, "--epoch", "3")) == 2
    line = one_error_line(capsys)
    path = tmp_path / "ckpt" / CHECKPOINT
    assert "training diverged at epoch 2 step 1: the loss is nan" in line, line
    assert f"saved the last good selection (epoch 1 step 2, uncalibrated) to {path}" in line
    assert "lower --learning_rate (this run: 0.001)" in line
    state = read_checkpoint(path)  # finite weights, or it would refuse them
    assert state["meta"]["diverged"] == {"epoch": 2, "step": 1} and state["meta"]["best_epoch"] == 1
    assert not (tmp_path / "out" / "metrics.json").exists() and leftovers(tmp_path / "ckpt") == []


def test_a_diverged_run_without_a_selection_saves_nothing(bench, tmp_path, capsys, nan_at_step):
    nan_at_step(2)
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, "--select", "last")) == 2
    line = one_error_line(capsys)
    assert "training diverged at epoch 1 step 2: the loss is nan" in line and "no adapters saved" in line, line
    assert not (tmp_path / "ckpt" / CHECKPOINT).exists()


def test_adapters_made_nan_by_the_last_step_are_not_saved(bench, tmp_path, capsys, monkeypatch):
    """A finite loss whose update leaves NaN weights (the last step: no later loss shows it) is caught too."""
    real = training.train_step
    steps = []

    def poisoned(model, *args, **kwargs):
        parts = real(model, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            next(iter(model.adapter_parameters())).data.fill_(float("nan"))
        return parts

    monkeypatch.setattr(training, "train_step", poisoned)
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, "--select", "last")) == 2
    line = one_error_line(capsys)
    assert "training diverged at epoch 1 step 2: the adapters hold NaN or infinite values" in line, line
    assert not (tmp_path / "ckpt" / CHECKPOINT).exists()


# ---------------------------------------------------------------------------------------------
# 4. One run at a time per --output_dir


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(f"{pid} {host or socket.gethostname()}\n")
    return lock


def test_a_second_run_into_a_busy_output_dir_is_refused(bench, tmp_path, capsys, no_model):
    lock = write_lock(tmp_path / "out", os.getpid())  # a live owner: this very process
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--save_path", str(bench["ckpt"].parent))) == 2
    line = one_error_line(capsys)
    assert f"--output_dir {tmp_path / 'out'} is in use by another run (process {os.getpid()}, {lock})" in line, line
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"  # the owner's lock is kept

    lock.write_text("123 another-host\n")  # an owner elsewhere cannot be checked: refused too
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--save_path", str(bench["ckpt"].parent))) == 2
    assert "in use by process 123 on another-host" in one_error_line(capsys)


def test_a_stale_lock_is_taken_over_and_every_lock_is_removed(bench, tmp_path, capsys):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid names no process now
    lock = write_lock(tmp_path / "out", finished.pid)
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--save_path", str(bench["ckpt"].parent))) == 0
    assert f"note: took over {lock} from process {finished.pid}, which is no longer running" in capsys.readouterr().out
    assert (tmp_path / "out" / "metrics.json").is_file() and leftovers(tmp_path / "out") == []

    # a failed run removes its lock, and the output folder it made when nothing went into it
    fresh = tmp_path / "fresh" / "out"
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--checkpoint", str(tmp_path / "absent.pth"), out=fresh)) == 2
    assert "absent.pth" in one_error_line(capsys) and not (tmp_path / "fresh").exists()


def test_only_the_writing_rank_holds_the_folder(tmp_path):
    """Under torchrun rank 0 alone writes, so it alone locks (and makes) --output_dir."""
    with folder_lock(tmp_path / "out", "--output_dir", MVFAError, active=False):
        assert not (tmp_path / "out").exists()
    with folder_lock(tmp_path / "out", "--output_dir", MVFAError):
        assert (tmp_path / "out" / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(MVFAError, match="in use by another run"):
            with folder_lock(tmp_path / "out", "--output_dir", MVFAError):
                pass
    assert not (tmp_path / "out").exists()  # made here and left empty: removed


# ---------------------------------------------------------------------------------------------
# 5. Bad numbers: one line before any model is built


@pytest.mark.parametrize("flags, expected", [
    (["--img_size", "13"], "--img_size 13 is invalid: use 14 or more (one patch of ViT-Tiny-14 is 14 pixels"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0 is invalid: use 1 or more"),
    (["--num_workers", "-1"], "--num_workers -1 is invalid: use 0 or more"),
    (["--learning_rate", "nan"], "--learning_rate nan is invalid: use a positive finite step"),
    (["--learning_rate", "-0.001"], "--learning_rate -0.001 is invalid"),
    (["--learning_rate", "inf"], "--learning_rate inf is invalid"),
    (["--epoch", "-1"], "--epoch -1 is invalid: use 0 or more"),
    (["--batch_size", "0"], "--batch_size 0 is invalid: use 1 or more"),
    (["--shot", "0"], "--shot 0 is invalid: use 1 or more"),
    (["--iterate", "-2"], "--iterate -2 is invalid: use -1 or more"),
    (["--seed", "-1"], "--seed -1 is invalid: use a number from 0 to 4294967295"),
    (["--target_fpr", "2"], "--target_fpr 2.0 is invalid: use a rate between 0 and 1"),
    (["--features_list", "0"], "--features_list 0 is invalid: give increasing block numbers from 1 to 8"),
    (["--features_list", "2", "9"], "--features_list 2 9 is invalid"),
    (["--features_list", "4", "2"], "--features_list 4 2 is invalid"),
    (["--pretrain", "imagenet"], "--pretrain 'imagenet' is not known: choose one of openai, none"),
])
def test_bad_numbers_give_one_line_before_any_model(bench, tmp_path, capsys, no_model, flags, expected):
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING, *flags)) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# 6. A DataLoader worker's error, and Ctrl-C


def release_adapters(path: Path) -> Path:
    """Untrained tiny adapters without metadata (as the release's), for test runs that fail before scoring."""
    torch.manual_seed(0)
    save_checkpoint(AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES]).adapter_state(), path)
    return path


def truncate_image(liver: Path) -> str:
    image = sorted((liver / "test" / "good" / "img").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])
    return image.name


def zero_one_mask(liver: Path) -> str:
    mask = sorted((liver / "test" / "Ungood" / "anomaly_mask").iterdir())[0]
    pixels = (torch.rand(64, 64) > 0.5).numpy().astype("uint8")  # values 0 and 1
    Image.fromarray(pixels).save(mask)
    return mask.name


@pytest.mark.parametrize("breaker, expected", [(truncate_image, ""), (zero_one_mask, "holds values 0, 1")])
def test_a_worker_error_is_one_line(bench, tmp_path, capsys, breaker, expected):
    data = tmp_path / "data"
    shutil.copytree(bench["data"] / "Liver_AD", data / "Liver_AD")
    name = breaker(data / "Liver_AD")
    flags = tiny_argv(data, bench["clip"], tmp_path / "ckpt", tmp_path / "out", "Liver", "--num_workers", "2",
                      "--checkpoint", str(release_adapters(tmp_path / "adapters.pth")))
    assert cli.main_test_zero(flags) == 2
    line = one_error_line(capsys)
    assert name in line and expected in line and "DataLoader" not in line, line


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def interrupted_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "Traceback" not in err, err
    return lines[0]


def copy_of_earlier_run(bench: dict, tmp_path: Path) -> tuple[Path, Path]:
    save, out = tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(bench["ckpt"].parent, save)
    shutil.copytree(bench["out"], out)
    return save, out


def test_ctrl_c_during_a_run_leaves_earlier_results_intact(bench, tmp_path, capsys, monkeypatch):
    save, out = copy_of_earlier_run(bench, tmp_path)
    before = (snapshot(save), snapshot(out))
    monkeypatch.setattr(runs, "evaluate", interrupt)  # the first evaluation of the re-run
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING)) == cli.INTERRUPTED
    interrupted_line(capsys)
    assert (snapshot(save), snapshot(out)) == before
    assert leftovers(save) == [] and leftovers(out) == []


def test_ctrl_c_while_the_checkpoint_is_written_leaves_the_earlier_one(bench, tmp_path, capsys, monkeypatch):
    save, out = copy_of_earlier_run(bench, tmp_path)
    before = (snapshot(save), snapshot(out))

    real_save = torch.save

    def half_written(obj, path, *args, **kwargs):
        if not Path(path).name.startswith(f".{CHECKPOINT}."):  # e.g. a text-cache entry
            return real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"half a checkpoint")  # into the temporary file beside the checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written)
    assert cli.main_train_few(argv(bench, tmp_path, *TRAINING)) == cli.INTERRUPTED
    interrupted_line(capsys)
    assert (snapshot(save), snapshot(out)) == before
    assert leftovers(save) == [] and leftovers(out) == []
    json.loads((out / "metrics.json").read_text())  # the earlier run's, whole


def test_a_precision_the_cpu_does_not_run_is_reported_as_what_ran(bench, tmp_path, capsys):
    """--precision bf16 on the CPU computes in fp32 (no CPU autocast): a note says so and metrics.json records fp32."""
    trained_copy(bench, tmp_path)
    assert cli.main_test_few(argv(bench, tmp_path, "--shot", "1", "--precision", "bf16")) == 0
    assert "note: --precision bf16 has no effect on the CPU: this run computes in fp32" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["precision"] == "fp32"
