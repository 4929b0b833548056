"""The engine: one training loop and one evaluation path for few-shot and zero-shot runs.

`run(config)` serves all four scripts: it builds the model, prepares the data of the mode
(few-shot: the augmented k-shot support; zero-shot: the other datasets' test splits), trains with
model selection (`--select test|valid|last`) or loads adapters, evaluates, and writes the results.

After training, `calibrate` (mvfa.calibration) fits fixed normalisation statistics on valid normal
images (not the support) and chooses a decision threshold on valid data; both go into the
checkpoint's `meta` (plain data), so that mvfa.predict can score new images one at a time.

Several processes (`run(config, dist)` under torchrun): every evaluation is sharded over the ranks
with results equal to a single process's (mvfa.evaluation). Training runs identically on every
rank and rank 0's adapters are broadcast before each evaluation, so the release's batch-1 result
is kept; with `config.ddp` (zero-shot training) each rank instead takes a disjoint part of every
batch and the gradients are averaged (effective batch: ranks x --batch_size). Only rank 0 prints
and writes files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from CLIP import create_model
from CLIP.clip import OPENAI, resolve_pretrained
from CLIP.config import load_config
from dataset.medical import (
    MedicalDataset,
    Sample,
    open_dataset,
    select_support,
    source_datasets_for_zero_shot,
    write_seed_file,
)

from .augment import augment
from .calibration import SCORE_SCALE, calibrate, fit_reference, stored_normalization, stored_threshold
from .distributed import SINGLE, Dist, barrier, gather_objects, quiet_unless_main
from .errors import CheckpointFormatError, MVFAError
from .files import folder_lock, nearest_existing, writable_folder, write_text_atomic
from .evaluation import (
    THRESHOLD_RULES,
    EvalResult,
    MemoryBank,
    Normalization,
    PrefixCache,
    TensorSet,
    autocast_for,
    bank_branch,
    build_memory_bank,
    check_two_classes,
    compute_prefixes,
    evaluate,
    prefix_bytes,
    threshold_metrics,
)
from .model import AdaptedViT, read_checkpoint, save_checkpoint
from .prompts import object_word
from .text import TextFeatureBank
from .replay import ReleaseRandom, listing_of
from .run_log import LOGGERS, RunLogger, make_logger
from .training import (
    EVAL_SCHEDULES,
    Selector,
    TrainingDiverged,
    after_epoch,
    final_zero_shot_points,
    few_shot_batches,
    release_zero_shot_points,
    train_loop,
    zero_shot_batches,
)
from .visualize import overlay, save_png

MODES = ("few-shot", "zero-shot")
SELECTIONS = ("test", "valid", "last")
PREFIX_CACHE_MODES = ("auto", "on", "off")
CUDA_CACHE_SHARE = 0.5  # auto: prefix caches may use this share of free GPU memory
CPU_CACHE_SHARE = 0.25  # ... or of the machine's RAM
PRECISIONS = ("fp32", "fp16", "bf16")
NORMALIZATIONS = ("test", "valid", "checkpoint")
CALIBRATION_RULES = (*THRESHOLD_RULES, "none")
SCORING_DTYPES = ("release", "fp32")  # CUDA with --precision fp16/bf16: the release's dtypes, or fp32 scoring
ORDERS = ("release", "sorted")  # zero-shot training: the file system's listing order (the release's) or sorted names
PRETRAINS = (OPENAI, "none")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1
# settings that only training reads: recorded in the checkpoint, and left out of a test run's config
TRAINING_SETTINGS = ("epoch", "learning_rate", "batch_size", "det_loss", "order", "eval_schedule")
TRAINING_ONLY = (*TRAINING_SETTINGS, "listings", "threshold_rule", "target_fpr", "ddp", "save_model", "overwrite")
DEFAULT_SEED_DIR = Path(__file__).resolve().parents[1] / "dataset" / "fewshot_seed"
TEST_LABEL_WARNING = (
    "note: --select test picks the checkpoint with the best test-set AUROC, as the release did to "
    "produce the paper's tables; it uses test labels (use --select valid for a sound estimate)"
)


@dataclass
class RunConfig:
    """Everything a run needs; the scripts fill it from their flags."""

    mode: str  # "few-shot" or "zero-shot"
    train: bool
    obj: str
    data_path: Path
    save_path: Path
    output_dir: Path
    model_name: str = "ViT-L-14-336"
    clip_ckpt: Path | None = None
    pretrain: str = OPENAI
    img_size: int = 240
    features_list: tuple[int, ...] = (6, 12, 18, 24)
    shot: int = 4
    iterate: int = 0
    seed: int = 111
    epoch: int = 50
    learning_rate: float = 1e-3
    batch_size: int = 1
    eval_batch_size: int = 8
    save_model: bool = True
    select: str = "test"
    prompt_name: str | None = None
    fewshot_seed_dirs: tuple[Path, ...] = (DEFAULT_SEED_DIR,)
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int = 0
    quick_gelu: bool | None = None
    det_loss: str = "release"
    checkpoint: Path | None = None  # test scripts: an explicit adapter checkpoint
    prefix_cache: str = "auto"  # cache the frozen blocks' outputs of repeatedly used images: auto, on, off
    cache_dir: Path | None = None  # on-disk cache of text features; None: no disk cache
    normalize: str = "test"  # test scripts: test (the release's min-max over the test set), valid, checkpoint
    save_maps: int | None = None  # test scripts: None no overlays, 0 every test image, N the N highest and lowest
    threshold_rule: str = "f1"  # training: calibration's threshold rule (f1, fpr) or none (no calibration)
    target_fpr: float = 0.05  # training, threshold_rule fpr: the valid normal images' flagged share
    only_normal: bool = False  # few-shot test: k normal images as memory bank, zero-shot adapters (checkpoint), no abnormal image
    ddp: bool = False  # zero-shot training: data-parallel over the ranks of a torchrun job (each rank a part of every batch)
    compile: bool = False  # torch.compile the adapted model's forward (off: the release's eager kernels)
    order: str = "release"  # zero-shot training: listing order of the sources' images (release: the file system's; sorted)
    listings: Path | None = None  # zero-shot training: a JSON of recorded listings (folder -> names) to replay
    scoring_dtypes: str = "release"  # CUDA autocast runs: release (the release's dtypes op for op) or fp32 (scoring in fp32)
    logger: str = "none"  # training: none, or tensorboard (event files under <output_dir>/tensorboard)
    eval_schedule: str = "release"  # zero-shot training: when the target is scored (release; final: after N/5 ... N steps)
    # training: replace a checkpoint of the same name made with other settings; the training scripts pass
    # --overwrite (default off); library callers that own their --save_path (demo, reproduce) replace
    overwrite: bool = True
    extra: dict = field(default_factory=dict)

    def run_tag(self) -> str:
        if self.mode == "few-shot":
            return f"{self.shot}shot-it{self.iterate}-seed{self.seed}"
        return f"zero-seed{self.seed}"

    def checkpoint_name(self) -> str:
        return f"{self.obj}-{self.run_tag()}.pth"

    def validate(self) -> None:
        """Every setting against its choices or range, before anything is read or built: one MVFAError
        line naming the flag, its value and what is valid. The training settings (epoch, learning rate,
        batch, calibration) are checked in training runs only: the test scripts do not read them."""
        for flag, value, choices in (
            ("mode", self.mode, MODES), ("--select", self.select, SELECTIONS), ("--precision", self.precision, PRECISIONS),
            ("--normalize", self.normalize, NORMALIZATIONS), ("--threshold_rule", self.threshold_rule, CALIBRATION_RULES),
            ("--order", self.order, ORDERS), ("--logger", self.logger, LOGGERS), ("--pretrain", self.pretrain, PRETRAINS),
            ("--scoring_dtypes", self.scoring_dtypes, SCORING_DTYPES), ("--prefix_cache", self.prefix_cache, PREFIX_CACHE_MODES),
            ("--eval_schedule", self.eval_schedule, EVAL_SCHEDULES),
        ):
            if value not in choices:
                raise MVFAError(f"{flag} {value!r} is not known: choose one of {', '.join(choices)}")
        clip_config = load_config(self.model_name)
        if self.pretrain == OPENAI:  # the CLIP weights are there (read when the model is built)
            resolve_pretrained(clip_config, self.clip_ckpt if self.clip_ckpt is not None else OPENAI)
        vision = clip_config.vision
        least = [("--eval_batch_size", self.eval_batch_size, 1), ("--num_workers", self.num_workers, 0),
                 ("--img_size", self.img_size, vision.patch_size)]
        if self.train:
            least += [("--epoch", self.epoch, 0), ("--batch_size", self.batch_size, 1)]
        if self.mode == "few-shot":
            least += [("--shot", self.shot, 1), ("--iterate", self.iterate, -1)]
        for flag, value, lowest in least:
            if value < lowest:
                why = {"--img_size": f" (one patch of {self.model_name} is {lowest} pixels; the release: 240)",
                       "--iterate": " (-1: a random draw from --seed; N >= 0: line N of the seed file)"}.get(flag, "")
                raise MVFAError(f"{flag} {value} is invalid: use {lowest} or more{why}")
        if not 0 <= self.seed <= MAX_SEED:
            raise MVFAError(f"--seed {self.seed} is invalid: use a number from 0 to {MAX_SEED}")
        stages = list(self.features_list)
        if not stages or sorted(set(stages)) != stages or stages[0] < 1 or stages[-1] > vision.layers:
            raise MVFAError(f"--features_list {' '.join(map(str, stages))} is invalid: give increasing block numbers "
                            f"from 1 to {vision.layers} ({self.model_name} has {vision.layers} blocks; the release: "
                            "6 12 18 24 of ViT-L-14-336's 24)")
        if self.save_maps is not None and self.save_maps < 0:
            raise MVFAError(f"--save_maps {self.save_maps} is invalid: give no number (every image) or N >= 1")
        if self.train:
            self._validate_training()
        if self.only_normal and (self.train or self.mode != "few-shot" or self.checkpoint is None):
            raise MVFAError("--only_normal is a few-shot test mode: it needs --zero_shot_ckpt (a zero-shot checkpoint) and no training")
        if self.ddp and not (self.mode == "zero-shot" and self.train):
            raise MVFAError("--ddp is for zero-shot training (train_zero.py): other runs train on one support set per rank")

    def _validate_training(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise MVFAError(f"--learning_rate {self.learning_rate} is invalid: use a positive finite step "
                            "(the release: 1e-3 few-shot, 1e-4 zero-shot)")
        if not 0.0 < self.target_fpr < 1.0:  # read by --threshold_rule fpr, and by f1 without abnormal valid images
            raise MVFAError(f"--target_fpr {self.target_fpr} is invalid: use a rate between 0 and 1 (e.g. 0.05)")


@dataclass
class RunResult:
    metrics: dict
    checkpoint: Path | None
    output_dir: Path
    evaluation: EvalResult


def seed_everything(seed: int) -> None:
    """Seed the global generators, as the release does (a --pretrain none backbone draws from torch's);
    the release's own draws are replayed on private generators (mvfa.replay)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bank_precision(config: RunConfig) -> str:
    """The memory bank's forward: without autocast (fp32) with the release's dtypes, as the release
    builds it; else under the run's autocast."""
    return "fp32" if config.scoring_dtypes == "release" else config.precision


# ------------------------------------------------------------------------------------------------
# Model


def build_model(config: RunConfig, device: torch.device, visual_fp32_later: bool = False) -> tuple[AdaptedViT, TextFeatureBank]:
    """CLIP (frozen) + adapters on `device`, and the text features bank of the same CLIP.

    visual_fp32_later: the visual tower keeps the checkpoint's dtype until the caller has every text
    feature it needs, drops the text tower and calls `model.visual.float()` or, in a test run,
    `model.float_with_block_workspace()` (the frozen blocks stay in the checkpoint's dtype): the two
    fp32 towers never coexist."""
    return build_adapted_model(
        config.model_name, config.img_size, config.features_list, config.clip_ckpt, config.pretrain,
        config.quick_gelu, device, config.cache_dir, visual_fp32_later,
    )


def build_adapted_model(
    model_name: str, img_size: int, features_list, clip_ckpt: Path | None, pretrain: str, quick_gelu: bool | None,
    device: torch.device, cache_dir: Path | None, visual_fp32_later: bool = False,
) -> tuple[AdaptedViT, TextFeatureBank]:
    """build_model's work from plain settings (mvfa.predict and mvfa.export_onnx use it too)."""
    pretrained = None
    if pretrain == OPENAI:
        pretrained = clip_ckpt if clip_ckpt is not None else OPENAI
    elif pretrain != "none":
        raise MVFAError(f"--pretrain {pretrain!r} is not known: choose openai (with --clip_ckpt) or none")
    if img_size < 1:
        raise MVFAError(f"--img_size {img_size} is invalid: use a positive number of pixels")
    clip_model = create_model(model_name, img_size, pretrained=pretrained, device=device, quick_gelu=quick_gelu,
                              keep_dtype_of=("visual.",) if visual_fp32_later else ())
    try:
        model = AdaptedViT(clip_model, list(features_list)).to(device)
    except ValueError as err:
        raise MVFAError(f"--features_list {' '.join(map(str, features_list))}: {err}") from None
    return model, TextFeatureBank(clip_model, cache_dir)


class _CompiledMethod:
    """A method of the model under torch.compile; a failure to compile it is a one-line MVFAError."""

    def __init__(self, method, name: str) -> None:
        self.compiled = torch.compile(method)
        self.name = name

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # dynamo's and inductor's own failures (not user errors)
            cause = getattr(err, "inner_exception", None) or err.__cause__ or err  # e.g. the C++ compiler's error
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            reason = f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__
            raise MVFAError(f"--compile: torch.compile failed on the model's {self.name} ({reason}); run without --compile") from None


def compile_model(model: AdaptedViT) -> None:
    """--compile: torch.compile (inductor) the two halves of the adapted ViT's forward, `encode_prefix`
    (the frozen blocks before the first adapter stage) and `forward_from_prefix` (the rest, with the
    adapters), which every training step, evaluation, prefix cache and memory bank goes through.

    Compilation happens at the first call of each shape and grad mode (a few recompilations per run).
    Compiled kernels fuse and order operations differently, so results agree with the eager run to
    float rounding, not bit for bit; without --compile nothing changes.
    """
    try:
        import torch._dynamo  # noqa: F401 - the exception classes _CompiledMethod catches
    except Exception as err:  # a torch build without dynamo
        raise MVFAError(f"--compile: torch.compile is not available in this torch build ({err}); run without --compile") from None
    model.encode_prefix = _CompiledMethod(model.encode_prefix, "frozen blocks (encode_prefix)")
    model.forward_from_prefix = _CompiledMethod(model.forward_from_prefix, "adapted blocks (forward_from_prefix)")


def checkpoint_metadata(config: RunConfig, dataset: MedicalDataset, word: str) -> dict:
    """Plain data stored beside the adapters, so the checkpoint says what it was trained for."""
    return {
        "format": "mvfa-adapters/1",
        "mode": config.mode,
        "obj": config.obj,
        "object_word": word,
        "has_masks": dataset.has_masks,
        "model_name": str(config.model_name),
        "img_size": config.img_size,
        "features_list": list(config.features_list),
        "quick_gelu": bool(load_config(config.model_name).with_quick_gelu(config.quick_gelu).quick_gelu),
        "shot": config.shot if config.mode == "few-shot" else 0,
        "iterate": config.iterate if config.mode == "few-shot" else -1,
        "seed": config.seed,
        "select": config.select,
        # the CLIP weights (absolute, so predict finds them from any folder; None: OpenAI's file of the model)
        "pretrain": config.pretrain,
        "clip_ckpt": str(Path(config.clip_ckpt).resolve()) if config.clip_ckpt is not None else None,
        **{key: getattr(config, key) for key in TRAINING_SETTINGS},
        "trained": config.epoch > 0,  # --epoch 0 saves the initial random adapters
    }


def find_checkpoint(config: RunConfig) -> Path:
    """The adapters a test script reads: --checkpoint, else <save_path>/<our name>, else <save_path>/<obj>.pth."""
    if config.checkpoint is not None:
        if not config.checkpoint.is_file():
            raise MVFAError(f"adapter checkpoint not found: {config.checkpoint} (from --checkpoint)")
        return config.checkpoint
    candidates = [config.save_path / config.checkpoint_name(), config.save_path / f"{config.obj}.pth"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MVFAError(
        f"no adapter checkpoint for {config.obj} in {config.save_path}: looked for "
        f"{' and '.join(c.name for c in candidates)}; train first or pass --save_path"
    )


# ------------------------------------------------------------------------------------------------
# Checks before a run: outputs, the checkpoint a training run replaces, the one a test run reads

RESULT_FILES = ("metrics.json", "predictions.csv", "train_log.csv")
# a test run's settings that must be those the adapters were trained with (meta key -> flag)
MODEL_SETTINGS = {
    "mode": "mode", "obj": "--obj", "object_word": "--prompt_name", "model_name": "--model_name", "img_size": "--img_size",
    "features_list": "--features_list", "quick_gelu": "--quick_gelu", "pretrain": "--pretrain",
}
# settings that change what training makes; a checkpoint's name records only object, shot, iterate and seed
SAME_RUN_SETTINGS = (*MODEL_SETTINGS, "shot", "iterate", "seed", "select", "clip_ckpt", *TRAINING_SETTINGS)
NOT_RECORDED = "not recorded"


def check_output_folder(folder: Path, flag: str) -> None:
    """`folder` is, or can be made as, a folder this process may write in; a folder without write bits
    is read-only even for root (who could write there): that is what clearing them asks for."""
    if folder.exists() and not folder.is_dir():
        raise MVFAError(f"{flag} {folder} is a file, not a folder: pass a folder (it is made when missing)")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise MVFAError(f"{flag} {folder} cannot be made: {existing} is a file, not a folder; choose another path")
    if not writable_folder(existing):
        where = "is read-only" if folder.exists() else f"cannot be made: {existing} is read-only"
        raise MVFAError(f"{flag} {folder} {where} (no write permission): make it writable or choose another folder")


def check_outputs(config: RunConfig) -> None:
    """Before any work: every place the run writes (--output_dir and its result files, --save_path and
    the checkpoint) can take what the run writes there, so that no error waits until the end."""
    check_output_folder(config.output_dir, "--output_dir")
    files = [config.output_dir / name for name in RESULT_FILES]
    if config.mode == "few-shot":
        files.append(config.output_dir / f"{config.shot}-shot.txt")
    if config.train and config.save_model:
        check_output_folder(config.save_path, "--save_path")
        files.append(config.save_path / config.checkpoint_name())
    for path in files:
        if path.exists() and not path.is_file():  # a file cannot be renamed onto it
            raise MVFAError(f"{path} is not a file, and this run writes a file there: move it away or choose another folder")
    maps = config.output_dir / "maps"
    if config.save_maps is not None and maps.exists() and not maps.is_dir():
        raise MVFAError(f"{maps} is a file, and --save_maps writes a folder there: move it away or choose another "
                        "--output_dir")


def _shown_setting(key: str, value) -> str:
    if key == "clip_ckpt" and value is None:
        return "OpenAI's file of the model"
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _change(key: str, ours, theirs) -> str:
    flag = MODEL_SETTINGS.get(key, f"--{key}")
    return f"{flag} {_shown_setting(key, ours)} (checkpoint: {_shown_setting(key, theirs)})"


def _same_model(ours: str, theirs) -> bool:
    """Model names agree as written, or as the same JSON config file."""
    if str(ours) == str(theirs):
        return True
    return Path(ours).is_file() and Path(str(theirs)).is_file() and Path(ours).resolve() == Path(str(theirs)).resolve()


def check_checkpoint_meta(config: RunConfig, meta: dict, path: Path, word: str) -> None:
    """A test run's settings against the metadata of the adapters it scores, before anything is scored.

    Adapters trained for another object, mode, model, input size, stages, activation, prompt word or
    CLIP weights (--pretrain) still give plausible AUCs and apply their stored threshold, so every
    mismatch is named in one error line (flag, this run's value, the checkpoint's). --only_normal
    scores with zero-shot adapters on purpose: it expects a zero-shot checkpoint. Decision: another
    --obj is refused even from an explicit --checkpoint, with no override: a zero-shot checkpoint of
    Liver was trained on the other datasets' test images (on Brain it has seen the test set), and a
    few-shot one on another dataset's support. A release checkpoint (no metadata) cannot be checked:
    a note says so. Other CLIP weights than recorded (--clip_ckpt) give a note (a copy is fine).
    """
    if not meta:
        print(f"note: {path} has no metadata (a release checkpoint?): its model, input size, stages and "
              "object cannot be checked against this run's flags")
        return
    ours = {
        "mode": "zero-shot" if config.only_normal else config.mode, "obj": config.obj, "object_word": word,
        "model_name": str(config.model_name), "img_size": config.img_size, "features_list": list(config.features_list),
        "quick_gelu": bool(load_config(config.model_name).with_quick_gelu(config.quick_gelu).quick_gelu),
        "pretrain": config.pretrain,
    }
    differ = [key for key, value in ours.items()
              if key in meta and not (_same_model(value, meta[key]) if key == "model_name" else value == meta[key])]
    if "obj" in differ and "object_word" in differ:  # the word follows from the object
        differ.remove("object_word")
    changes = [_mode_change(config, meta["mode"]) if key == "mode" else _change(key, ours[key], meta[key]) for key in differ]
    if changes:
        raise MVFAError(f"{path} does not fit this run: {'; '.join(changes)}: pass the checkpoint's values, or a "
                        "checkpoint trained for this run")
    recorded, loaded = meta.get("clip_ckpt"), config.clip_ckpt
    if recorded is not None and loaded is not None and Path(recorded) != Path(loaded).resolve():
        print(f"note: {path} was trained on the CLIP weights {recorded}; this run loads {loaded}")
    if meta.get("trained") is False:
        print(f"note: {path} holds untrained adapters (trained with --epoch 0)")


def _mode_change(config: RunConfig, theirs) -> str:
    if config.only_normal:
        return f"--zero_shot_ckpt needs a zero-shot checkpoint (this one is {theirs})"
    other = "test_few.py" if theirs == "few-shot" else "test_zero.py" if theirs == "zero-shot" else "?"
    return f"a {config.mode} test needs a {config.mode} checkpoint (this one is {theirs}: test it with {other})"


def read_test_checkpoint(config: RunConfig, word: str) -> tuple[Path, dict, dict]:
    """The adapters a test run scores (path, state, meta), read and checked before any model is built."""
    path = find_checkpoint(config)
    state = read_checkpoint(path)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    check_checkpoint_meta(config, meta, path, word)
    return path, state, meta


def check_replaced_checkpoint(config: RunConfig, planned: dict, dist: Dist) -> None:
    """Before training: keep an earlier run's work. The checkpoint this run saves may exist already; its
    name records only object, shot, iterate and seed, so one made with other settings (another
    learning rate, epoch count, --epoch 0, ...) is replaced only with --overwrite; the same
    settings are a re-run, replaced with a note. --epoch 0 is said at once (untrained adapters)."""
    if config.epoch == 0:
        print("note: --epoch 0: the adapters are not trained; their initial random values are evaluated "
              "(and saved, marked untrained)")
    path = config.save_path / config.checkpoint_name()
    if not (config.save_model and dist.is_main and path.exists()):
        return
    try:
        old = read_checkpoint(path).get("meta") or {}
    except CheckpointFormatError as err:
        if not config.overwrite:
            raise MVFAError(f"{err}; this run would replace it: pass --overwrite to do so, or choose another --save_path") from None
        print(f"note: --overwrite: this run replaces {path}, which is not a readable checkpoint")
        return
    if old:
        changes = [_change(key, planned[key], old.get(key, NOT_RECORDED)) for key in SAME_RUN_SETTINGS
                   if old.get(key, NOT_RECORDED) != planned[key]]
    else:
        changes = ["no metadata: its settings are unknown"]
    if old.get("trained", old.get("epoch") != 0) and not planned["trained"]:
        changes.insert(0, "trained adapters would be replaced by untrained ones")
    if not changes:
        print(f"note: {path} exists, made with the same settings: this run replaces it (a re-run)")
    elif config.overwrite:
        print(f"note: --overwrite: this run replaces {path} ({'; '.join(changes)})")
    else:
        raise MVFAError(
            f"{path} holds adapters made with other settings: {'; '.join(changes)}; a checkpoint's name records only "
            "the object, shot, iterate and seed: pass --overwrite to replace it, or choose another --save_path"
        )


def save_adapters(config: RunConfig, model: AdaptedViT, meta: dict, dist: Dist) -> Path | None:
    """--save_model: the adapters and their metadata to <save_path>/<checkpoint name> (rank 0 writes)."""
    if not config.save_model:
        return None
    path = config.save_path / config.checkpoint_name()
    state = model.adapter_state()
    state["meta"] = meta
    if dist.is_main:
        save_checkpoint(state, path)
    print(f"saved {'' if meta.get('trained', True) else 'untrained (--epoch 0) '}adapters to {path}")
    return path


def keep_last_good(config: RunConfig, model: AdaptedViT, err: TrainingDiverged, meta: dict, dist: Dist) -> str:
    """A diverged run's error line; the last good selection is saved first when there is one (uncalibrated)."""
    advice = f"lower --learning_rate (this run: {config.learning_rate:g})"
    if err.best is None:
        return f"{err}; no adapters saved (no evaluation had selected adapters yet, --select {config.select}); {advice}"
    if not config.save_model:
        return f"{err}; nothing saved (--save_model 0); {advice}"
    model.load_adapter_state(err.best["adapters"])
    selected = {"best_epoch": err.best["epoch"], "best_step": err.best["step"]}
    path = save_adapters(config, model, {**meta, **selected, "diverged": err.where}, dist)
    return (f"{err}; saved the last good selection (epoch {err.best['epoch']} step {err.best['step']}, "
            f"uncalibrated) to {path}; {advice}")


# ------------------------------------------------------------------------------------------------
# Data of a run


@dataclass
class FewShotData:
    support_images: torch.Tensor | None  # augmented abnormal then augmented normal (None in test runs: no training)
    support_masks: torch.Tensor | None
    support_labels: torch.Tensor | None
    normal_images: torch.Tensor  # augmented normal (the memory bank's images)
    support_samples: list[Sample]
    support_prefixes: torch.Tensor | None = None  # frozen-block outputs of each support image (batch 1)
    memory_cache: PrefixCache | None = None  # the same for the memory bank's evaluation batches


class PrefixBudget:
    """Decides which image sets get a prefix cache: all (on), none (off), or while memory allows (auto)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in PREFIX_CACHE_MODES:
            raise MVFAError(f"--prefix_cache {mode!r} is not known: choose one of {', '.join(PREFIX_CACHE_MODES)}")
        self.mode = mode
        if device.type == "cuda":
            self.remaining = int(CUDA_CACHE_SHARE * torch.cuda.mem_get_info(device)[0])
        else:
            self.remaining = int(CPU_CACHE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def allow(self, nbytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        if nbytes > self.remaining:
            return False
        self.remaining -= nbytes
        return True


def cache_support_prefixes(model: AdaptedViT, few_shot: FewShotData, config: RunConfig, budget: PrefixBudget) -> None:
    """Frozen-block outputs of the augmented support: per image for training, per batch for the memory bank."""
    device = next(model.parameters()).device
    count = len(few_shot.support_labels) if few_shot.support_labels is not None else 0
    if count and budget.allow(prefix_bytes(model, count)):
        per_image = compute_prefixes(model, (few_shot.support_images[i : i + 1].to(device) for i in range(count)), config.precision)
        few_shot.support_prefixes = torch.cat(per_image.batches)
    if budget.allow(prefix_bytes(model, len(few_shot.normal_images))):
        size = config.eval_batch_size
        batches = (few_shot.normal_images[i : i + size].to(device) for i in range(0, len(few_shot.normal_images), size))
        few_shot.memory_cache = compute_prefixes(model, batches, config.precision, size)


def prepare_few_shot(config: RunConfig, dataset: MedicalDataset) -> tuple[FewShotData, object]:
    support = select_support(dataset, config.shot, config.iterate, config.seed, list(config.fewshot_seed_dirs))
    to_float = lambda images: images.float() / 255  # noqa: E731 - uint8 k/255 back to ToTensor's floats
    if not config.train:  # a test run needs the memory bank's images only: the drawn abnormal images are never loaded
        aug_normal, _ = augment(to_float(TensorSet.load(support.normal, config.img_size, desc="support").images))
        samples = list(support.normal) if config.only_normal else [*support.abnormal, *support.normal]
        return FewShotData(None, None, None, aug_normal, samples), support
    abnormal = TensorSet.load(support.abnormal, config.img_size, desc="support")
    normal = TensorSet.load(support.normal, config.img_size, desc="support")
    abnormal_masks = abnormal.masks[:, None].float() if dataset.has_masks else None
    aug_abnormal, aug_abnormal_masks = augment(to_float(abnormal.images), abnormal_masks)
    aug_normal, aug_normal_masks = augment(to_float(normal.images))
    data = FewShotData(
        support_images=torch.cat([aug_abnormal, aug_normal]),
        support_masks=torch.cat([aug_abnormal_masks, aug_normal_masks]),
        support_labels=torch.cat([torch.ones(len(aug_abnormal)), torch.zeros(len(aug_normal))]),
        normal_images=aug_normal,
        support_samples=[*support.abnormal, *support.normal],
    )
    return data, support


# ------------------------------------------------------------------------------------------------
# Files


def write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def predictions_csv(result: EvalResult, data_root: Path) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    for path, label, score in zip(result.paths, result.labels, result.image_scores):
        writer.writerow([_shown(path, data_root), int(label), f"{float(score):.8f}"])
    return buffer.getvalue()


def _shown(path, data_root: Path) -> str:
    """A path relative to the data folder when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _log_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def json_ready(config: RunConfig) -> dict:
    raw = asdict(config)
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "fewshot_seed_dirs" else v) for k, v in raw.items()}


def print_release_lines(obj: str, metrics: dict) -> None:
    print(f"{obj} AUC : {round(metrics['image_auroc'], 4)}")
    if "pixel_auroc" in metrics:
        print(f"{obj} pAUC : {round(metrics['pixel_auroc'], 4)}")


# ------------------------------------------------------------------------------------------------
# Overlays of the test images (--save_maps)


MAP_SCALES = {
    "test": "map (min-max over the test set)", "valid": "map (valid normalisation)",
    "checkpoint": "map (checkpoint normalisation)",
}


def map_overlays(
    config: RunConfig, result: EvalResult, data: TensorSet, maps_of, folder: Path, threshold: float | None = None,
) -> list[Path]:
    """Overlay figures of the test images (every one, or the --save_maps N highest and N lowest) and an index.csv.

    `maps_of(indices)` gives the maps of the chosen images ([n, S, S], on the run's normalised scale),
    or None on a rank that writes nothing (several ranks call this together: maps_of is collective).
    `threshold`: the checkpoint's decision threshold; each figure then states the decision, on the
    scores it applies to (`result.fixed_scores` when the maps are on another normalisation), and
    few-shot maps with masks (whose maximum is the image score) show the region above it.
    """
    on_threshold_scale = result.fixed_scores is None
    decision_scores = np.asarray(result.image_scores if on_threshold_scale else result.fixed_scores)
    pixel_threshold = threshold if on_threshold_scale and config.mode == "few-shot" and result.masks is not None else None
    scores = np.asarray(result.image_scores)
    count = len(scores)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(count, dtype=int)
    rank[order] = np.arange(1, count + 1)
    n = config.save_maps or 0
    if n <= 0 or 2 * n >= count:
        chosen = [(int(i), "") for i in range(count)]
    else:
        chosen = [(int(i), f"high{r + 1:02d}_") for r, i in enumerate(order[:n])]
        chosen += [(int(i), f"low{r + 1:02d}_") for r, i in enumerate(order[::-1][:n])]
    maps = maps_of([i for i, _ in chosen])
    if maps is None:
        return []
    used: set[str] = set()
    rows = [["file", "path", "label", "score", "rank"]]
    written = []
    for (index, prefix), image_map in zip(chosen, maps):
        path = Path(result.paths[index])
        kind = "abnormal" if int(result.labels[index]) else "normal"
        name = f"{prefix}{kind}_{path.stem}.png"
        if name in used:
            name = f"{prefix}{kind}_{path.stem}_{path.suffix.lstrip('.')}.png"
        used.add(name)
        mask = data.masks[index] if result.masks is not None and int(result.labels[index]) else None
        figure = overlay(
            data.images[index], image_map, mask, (0.0, 1.0), figure=True, name=path.name,
            score=float(decision_scores[index]), label=int(result.labels[index]), threshold=threshold,
            pixel_threshold=pixel_threshold, scale=MAP_SCALES[config.normalize],
        )
        written.append(save_png(figure, folder / name))
        rows.append([name, _shown(path, config.data_path), int(result.labels[index]), f"{float(scores[index]):.8f}", int(rank[index])])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_atomic(folder / "index.csv", buffer.getvalue())
    return written


def rows_of_maps(maps: torch.Tensor, map_range: tuple[int, int], indices: list[int], dist: Dist) -> torch.Tensor | None:
    """The maps of images `indices` (in that order) on rank 0, from the ranks that hold them; None elsewhere."""
    start, stop = map_range
    if not dist.active:
        return maps[[i - start for i in indices]]
    rows = {i: maps[i - start].cpu() for i in indices if start <= i < stop}
    gathered = gather_objects(rows, dist)
    if gathered is None:
        return None
    merged = {i: row for part in gathered for i, row in part.items()}
    return torch.stack([merged[i] for i in indices]) if indices else maps.new_empty((0, *maps.shape[1:])).cpu()


# ------------------------------------------------------------------------------------------------
# The run


def run(config: RunConfig, dist: Dist = SINGLE) -> RunResult:
    """Train (with selection) or test, per config.mode and config.train; write the run's files.

    dist: this process's place among the ranks of a torchrun job (the default: a single process).
    Every rank must call run with the same config; all return the same metrics, rank 0 alone
    prints and writes files, and they return together (after rank 0 has written).

    Before any work: the settings (RunConfig.validate) and the output places (check_outputs); then
    rank 0 holds --output_dir (a lock file: a second run into it is refused while this one works).
    """
    with quiet_unless_main(dist):
        config.validate()
        if dist.is_main:
            check_outputs(config)
        with folder_lock(config.output_dir, f"--output_dir {config.output_dir}", MVFAError, active=dist.is_main):
            result = _run(config, dist)
            barrier(dist)
    return result


def _run(config: RunConfig, dist: Dist) -> RunResult:
    device = torch.device(config.device)
    if device.type == "cpu" and config.precision != "fp32":  # autocast_for uses no autocast on the CPU
        print(f"note: --precision {config.precision} has no effect on the CPU: this run computes in fp32")
        config = replace(config, precision="fp32")
    release_dtypes = config.scoring_dtypes == "release"
    seed_everything(config.seed)
    started = time.time()

    sources = []  # zero-shot training's source datasets
    listings = None
    if config.mode == "zero-shot" and config.train:
        sources = source_datasets_for_zero_shot(config.data_path, config.obj)
        listings = read_listings(config.listings) if config.listings is not None else None
    target = open_dataset(config.data_path, config.obj)
    try:
        word = object_word(target.name, config.prompt_name)
    except KeyError as err:
        raise MVFAError(str(err.args[0])) from None

    test_samples = target.samples("test")
    check_two_classes(torch.tensor([s.label for s in test_samples]), f"the test split of {target.name}")
    source_words = {source.name: _source_word(config, source) for source in sources}
    if config.train:
        meta = checkpoint_metadata(config, target, word)  # what the saved adapters will record
        check_replaced_checkpoint(config, meta, dist)
    else:
        checkpoint_path, state, meta = read_test_checkpoint(config, word)
    model, replay, text_features, source_features = build_run_model(config, device, word, source_words)
    test_set = TensorSet.load(test_samples, config.img_size, config.num_workers, desc=f"{target.name} test")
    logger = make_logger(config.logger, config.output_dir) if config.train and dist.is_main else RunLogger()

    few_shot = None
    if config.mode == "few-shot":
        few_shot, support = prepare_few_shot(config, target)
        if config.only_normal:
            print(f"support: {config.shot} normal valid images, no abnormal image ({support.source})")
        else:
            print(f"support: {config.shot} abnormal + {config.shot} normal valid images ({support.source})")

    def memory_bank() -> MemoryBank | None:
        """The bank of the current adapters; only the branch the target's scoring reads (every
        evaluation of a few-shot run scores the target: selection, calibration, --normalize valid, test)."""
        if few_shot is None:
            return None
        return build_memory_bank(
            model, few_shot.normal_images, config.eval_batch_size, bank_precision(config), few_shot.memory_cache,
            branches=(bank_branch(target.has_masks),),
        )

    def score(data: TensorSet, features: torch.Tensor, has_masks: bool, full: bool = False, desc: str = "evaluating",
              **options) -> EvalResult:
        """`evaluate` with the run's model, memory bank and settings (options: evaluate's keywords)."""
        return evaluate(
            model, data, features, has_masks, memory_bank(), config.eval_batch_size, config.precision, full, desc=desc,
            dist=dist, release_dtypes=release_dtypes, **options,
        )

    budget = PrefixBudget(config.prefix_cache, device)
    if few_shot is not None and (config.train or config.prefix_cache == "on"):
        cache_support_prefixes(model, few_shot, config, budget)

    def cache(data: TensorSet) -> TensorSet:
        """Sets evaluated after every epoch keep their frozen-block outputs (this rank's batches), while the budget allows."""
        shard = dist.batch_shard(len(data), config.eval_batch_size)
        if budget.allow(prefix_bytes(model, shard[1] - shard[0])):
            data.cache_prefixes(model, config.eval_batch_size, config.precision, shard if dist.active else None)
        return data

    if config.train and config.select == "test":
        cache(test_set)

    log_rows: list[dict] = []
    support_samples = few_shot.support_samples if few_shot is not None else []
    if config.train:
        if config.select == "test":
            print(TEST_LABEL_WARNING)
        if config.mode == "few-shot":
            selector = _few_shot_selector(config, target, few_shot, test_set, text_features, score, cache)
            batches = few_shot_batches(config, few_shot, text_features, target.has_masks, replay)
        else:
            selector = _zero_shot_selector(config, target, sources, test_set, text_features, source_features, score, cache)
            batches = zero_shot_batches(
                config, sources, lambda source: source_features[source.name], budget.allow, replay,
                listing_of(config.order, listings, config.data_path), dist,
            )
        if few_shot is not None:
            meta["support"] = support_names(support)
        try:
            best_state = train_loop(config, model, batches, selector, log_rows, device, dist, logger)
        except TrainingDiverged as err:
            raise MVFAError(keep_last_good(config, model, err, meta, dist)) from None
        finally:
            logger.close()
        model.load_adapter_state(best_state["adapters"])
        meta.update(best_epoch=best_state["epoch"], best_step=best_state["step"])
        if config.threshold_rule != "none":
            meta.update(calibrate(config, model, target, text_features, memory_bank(), support_samples, dist))
        checkpoint_path = save_adapters(config, model, meta, dist)
    else:
        model.load_adapter_state(state, source=str(checkpoint_path))
        print(f"loaded adapters from {checkpoint_path}")
        if few_shot is not None and not config.only_normal:
            warn_other_support(meta, support, checkpoint_path)

    source = str(checkpoint_path) if checkpoint_path else "the trained adapters"
    normalization = chosen_normalization(
        config, meta, source, lambda: fit_reference(config, model, target, text_features, memory_bank(), support_samples, dist)[1]
    )
    threshold = stored_threshold(meta, source, config.mode, target.has_masks)
    score_under = threshold[1] if threshold is not None and normalization != threshold[1] else None

    result = score(test_set, text_features, target.has_masks, True, desc=f"{target.name} test",
                   normalization=normalization, score_under=score_under)
    metrics = {**result.metrics, "seconds": round(time.time() - started, 2)}
    print_release_lines(config.obj, metrics)
    payload = run_payload(config, metrics, result, checkpoint_path, meta, support if few_shot is not None else None,
                          best_state if config.train else None, dist)
    if threshold is not None:
        payload["threshold"] = threshold_report(result, threshold[0], score_under is not None, meta)
    if config.save_maps is not None:
        def maps_of(indices: list[int]) -> torch.Tensor | None:
            """The maps of test images `indices`: kept by the evaluation, else scored again (datasets without masks)."""
            if result.maps is not None:
                return rows_of_maps(result.maps, result.map_range, indices, dist)
            chosen = score(test_set.subset(indices), text_features, False, desc="maps", normalization=result.normalization,
                           keep_maps=True, metrics=False)
            return rows_of_maps(chosen.maps, chosen.map_range, list(range(len(indices))), dist)

        written = map_overlays(config, result, test_set, maps_of, config.output_dir / "maps",
                               threshold[0] if threshold is not None else None)
        print(f"wrote {len(written)} overlays to {config.output_dir / 'maps'}")
    if dist.is_main:
        write_run_files(config, result, payload, log_rows, support if few_shot is not None else None)
    return RunResult(metrics, checkpoint_path, config.output_dir, result)


def build_run_model(
    config: RunConfig, device: torch.device, word: str, source_words: dict[str, str],
) -> tuple[AdaptedViT, ReleaseRandom, torch.Tensor, dict[str, torch.Tensor]]:
    """The run's model with the release's initial adapters (training), its text features (the target's
    and each zero-shot source's), the text tower dropped, the visual tower in fp32; and the replay of
    the release's draws, which the training batches go on drawing from."""
    model, text_bank = build_model(config, device, visual_fp32_later=True)
    if config.compile:
        compile_model(model)
    replay = ReleaseRandom(config.seed)  # the release's draws: two random CLIP builds, then the adapters
    if config.train:
        replay.skip_clip_builds(load_config(config.model_name), config.img_size)
        replay.init_adapters(model.seg_adapters, model.det_adapters)
    if config.scoring_dtypes == "release" and device.type == "cuda" and config.precision != "fp32":
        # the release encodes its prompts under autocast
        text_bank.encoding_autocast = (f"autocast-{config.precision}", lambda: autocast_for(device, config.precision))
    text_features = text_bank(word)
    # zero-shot training scores each source against its own prompts
    source_features = {name: text_bank(source_word) for name, source_word in source_words.items()}
    text_bank.drop_text_tower()  # every word the run needs is encoded: free the text weights (0.5 GB for ViT-L)
    if config.train or config.compile:
        model.visual.float()
    else:  # a test run: the blocks keep the checkpoint's dtype, computed in fp32 (bit for bit the same)
        model.float_with_block_workspace()
    return model, replay, text_features, source_features


def chosen_normalization(config: RunConfig, meta: dict, source: str, fit_valid) -> Normalization | None:
    """The test evaluation's statistics: None for --normalize test (the release's min-max over the test
    set), fitted on valid normal images (`fit_valid()`), or the checkpoint's."""
    if config.normalize == "valid":
        normalization = fit_valid()
        print(f"normalisation: fitted on {normalization.source}")
        return normalization
    if config.normalize != "checkpoint":
        return None
    normalization = stored_normalization(meta, source)
    if normalization is None:
        raise MVFAError(
            f"{source} holds no normalisation statistics (a release checkpoint, or trained with "
            "--threshold_rule none or without valid data): use --normalize valid or test"
        )
    print(f"normalisation: stored in the checkpoint ({normalization.source})")
    return normalization


def run_payload(
    config: RunConfig, metrics: dict, result: EvalResult, checkpoint_path: Path | None, meta: dict, support,
    best_state: dict | None, dist: Dist,
) -> dict:
    """metrics.json: the metrics, the settings (a test run: the checkpoint's training settings), the support."""
    payload = {
        "obj": config.obj,
        "mode": config.mode,
        "script": ("train" if config.train else "test") + ("_few" if config.mode == "few-shot" else "_zero"),
        "metrics": metrics,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "normalization": {"mode": config.normalize, **result.normalization.to_dict()},
        "config": json_ready(config),
    }
    if best_state is None:  # the training settings are the checkpoint's, not this script's defaults
        for key in TRAINING_ONLY:
            payload["config"].pop(key, None)
        payload["training"] = {k: meta[k] for k in ("mode", "obj", "seed", "select", "best_epoch", "best_step",
                                                    "shot", "iterate", *TRAINING_SETTINGS) if k in meta}
    else:
        payload["training"] = {
            "epoch_losses": best_state["epoch_losses"], "best_epoch": best_state["epoch"], "best_step": best_state["step"],
        }
    if support is not None:
        payload["support"] = {"source": support.source, **support_names(support)}
    if config.ddp:
        payload["config"].update(world_size=dist.world_size, effective_batch_size=dist.world_size * config.batch_size)
    return payload


def threshold_report(result: EvalResult, value: float, under_other_statistics: bool, meta: dict) -> dict:
    """The checkpoint's threshold applied to the test images (on the scores it was chosen for); printed."""
    scores = result.fixed_scores if under_other_statistics else result.image_scores
    test = threshold_metrics(scores, result.labels, value)
    print(
        f"threshold {value:.4f} {SCORE_SCALE} ({meta.get('threshold_rule')} on valid): test precision "
        f"{test['precision']:.4f} recall {test['recall']:.4f} F1 {test['f1']:.4f} FPR {test['fpr']:.4f}"
    )
    return {"value": value, "rule": meta.get("threshold_rule"), "target_fpr": meta.get("target_fpr"),
            "normalization": "checkpoint", "test": test}


def write_run_files(config: RunConfig, result: EvalResult, payload: dict, log_rows: list[dict], support) -> None:
    """The run's files (rank 0): the support list, predictions.csv, train_log.csv, metrics.json."""
    if support is not None and config.iterate >= 0:  # written with the results: an early error leaves none
        seed_file = config.output_dir / f"{config.shot}-shot.txt"
        write_seed_file(seed_file, support, config.iterate)
        if config.only_normal:  # the draw as a whole keeps the file readable and the split the few-shot run's
            print(f"wrote {seed_file}: its a-{config.iterate} line names the drawn abnormal images, not used here")
    write_atomic(config.output_dir / "predictions.csv", predictions_csv(result, config.data_path))
    if log_rows:
        write_atomic(config.output_dir / "train_log.csv", _log_csv(log_rows))
    write_atomic(config.output_dir / "metrics.json", json.dumps(payload, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Model selection


def selection_samples(config: RunConfig, dataset: MedicalDataset, exclude: list[Sample]) -> list[Sample]:
    """--select valid for few-shot: the valid images that are not support images."""
    used = {s.path for s in exclude}
    samples = [s for s in dataset.samples("valid") if s.path not in used]
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise MVFAError(
            f"--select valid needs normal and abnormal valid images of {dataset.name} besides the "
            f"{config.shot}-shot support; {len(samples)} remain ({'none' if not labels else 'one class'}): "
            "use --select last or a smaller --shot"
        )
    return samples


def _few_shot_selector(config, target, few_shot, test_set, text_features, score, cache) -> Selector:
    if config.select == "valid":
        valid = cache(TensorSet.load(
            selection_samples(config, target, few_shot.support_samples), config.img_size, config.num_workers, desc="valid"
        ))
    data = test_set if config.select == "test" else valid if config.select == "valid" else None

    def scorer():
        result = score(data, text_features, target.has_masks, desc=f"{config.select} eval")
        return result.selection_score, {f"{config.select}_{k}": v for k, v in result.metrics.items()}

    return Selector(after_epoch, scorer, keep_ties=False, active=config.select != "last")


def _zero_shot_selector(config, target, sources, test_set, text_features, source_features, score, cache) -> Selector:
    valid_sets = []
    if config.select == "valid":
        for source in sources:
            samples = source.samples("valid")
            if {s.label for s in samples} == {0, 1}:
                data = cache(TensorSet.load(samples, config.img_size, config.num_workers, desc=f"{source.name} valid"))
                valid_sets.append((source, data, source_features[source.name]))
        if not valid_sets:
            raise MVFAError("--select valid needs a source dataset whose valid split has both classes")

    def scorer():
        if config.select == "test":
            result = score(test_set, text_features, target.has_masks, desc=f"{target.name} test eval")
            return result.selection_score, {f"test_{k}": v for k, v in result.metrics.items()}
        values, detail = [], {}
        for source, data, features in valid_sets:
            result = score(data, features, source.has_masks, desc=f"{source.name} valid eval")
            values.append(result.selection_score)
            detail[f"valid_{source.name}"] = result.selection_score
        return float(np.mean(values)), detail

    if config.eval_schedule == "release":  # before steps 0, N//5, 2N//5, ...; the latest tie wins
        return Selector(release_zero_shot_points, scorer, keep_ties=True, active=config.select != "last")
    return Selector(final_zero_shot_points, scorer, keep_ties=False, active=config.select != "last")


def read_listings(path: Path) -> dict[str, list[str]]:
    """--listings: a JSON object mapping image folders (relative to --data_path, e.g.
    "Brain_AD/test/good/img") to the file names in the order a recorded run listed them."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MVFAError(f"--listings {path} is not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v) for k, v in raw.items()
    ):
        raise MVFAError(f"--listings {path} must map folder names to lists of file names, e.g. "
                        '{"Brain_AD/test/good/img": ["0001.png", ...]}')
    return raw


def support_names(support) -> dict[str, list[str]]:
    return {"abnormal": [s.path.name for s in support.abnormal], "normal": [s.path.name for s in support.normal]}


def warn_other_support(meta: dict, support, checkpoint_path: Path) -> None:
    """test_few: one line when the checkpoint was trained on another support than the memory bank's."""
    recorded = meta.get("support")
    if not isinstance(recorded, dict) or recorded == support_names(support):
        return
    differs = [kind for kind in ("abnormal", "normal") if recorded.get(kind) != support_names(support)[kind]]
    print(
        f"warning: {checkpoint_path} was trained on another support ({' and '.join(differs)} images differ) than "
        f"this run's {support.source}: pass the --shot/--iterate/--fewshot_seed_dir of its training"
    )


def _source_word(config: RunConfig, source: MedicalDataset) -> str:
    """The object word of a zero-shot source dataset (only registered names can be sources)."""
    try:
        return object_word(source.name, None)
    except KeyError:
        raise MVFAError(
            f"zero-shot training uses {source.name} from {config.data_path}, which has no registered object "
            "word: remove it from --data_path or add it to mvfa.prompts.REAL_NAME"
        ) from None
