"""A run's settings (RunConfig: the scripts' flags as one record) and their validation."""
from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path

from CLIP.clip import OPENAI, resolve_pretrained
from CLIP.config import load_config

from mvfa.choices import (
    CALIBRATION_RULES, DEFAULT_SEED_DIR, EVAL_SCHEDULES, MODES, NORMALIZATIONS, ORDERS, PRECISIONS, PREFIX_CACHE_MODES,
    SCORING_DTYPES, SELECTIONS,
)
from mvfa.runs.run_log import LOGGERS
from mvfa.runtime.errors import MVFAError

PRETRAINS = (OPENAI, "none")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1
NO_SUPPORT = (0, -1)  # shot and iterate of a zero-shot run
TRAINING_SETTINGS = ("epoch", "learning_rate", "batch_size", "det_loss", "order", "eval_schedule")
TRAINING_ONLY = (*TRAINING_SETTINGS, "listings", "threshold_rule", "target_fpr", "ddp", "save_model", "overwrite")
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
    cuda_graph: bool = False  # training on CUDA: the step replayed from CUDA graphs (mvfa.runs.graph_step)
    order: str = "release"  # zero-shot training: listing order of the sources' images (release: the file system's; sorted)
    listings: Path | None = None  # zero-shot training: a JSON of recorded listings (folder -> names) to replay
    scoring_dtypes: str = "release"  # CUDA autocast runs: release (the release's dtypes op for op) or fp32 (scoring in fp32)
    logger: str = "none"  # training: none, or tensorboard (event files under <output_dir>/tensorboard)
    eval_schedule: str = "release"  # zero-shot training: when the target is scored (release; final: after N/5 ... N steps)
    # training: replace a checkpoint of the same name made with other settings; the training scripts pass
    # --overwrite (default off); library callers that own their --save_path (demo, reproduce) replace
    overwrite: bool = True

    def __post_init__(self) -> None:
        if self.mode == "zero-shot":  # no support: the values the checkpoint's metadata records
            self.shot, self.iterate = NO_SUPPORT

    def run_tag(self) -> str:
        if self.mode == "few-shot":
            return f"{self.shot}shot-it{self.iterate}-seed{self.seed}"
        return f"zero-seed{self.seed}"

    def label(self) -> str:
        """The run as a line names it among several: its --obj, and its --iterate (few-shot)."""
        return f"{self.obj} --iterate {self.iterate}" if self.mode == "few-shot" else self.obj

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
        self._validate_model()
        least = [("--eval_batch_size", self.eval_batch_size, 1), ("--num_workers", self.num_workers, 0)]
        if self.train:
            least += [("--epoch", self.epoch, 0), ("--batch_size", self.batch_size, 1)]
        if self.mode == "few-shot":
            least += [("--shot", self.shot, 1), ("--iterate", self.iterate, -1)]
        for flag, value, lowest in least:
            if value < lowest:
                why = " (-1: a random draw from --seed; N >= 0: line N of the seed file)" if flag == "--iterate" else ""
                raise MVFAError(f"{flag} {value} is invalid: use {lowest} or more{why}")
        if not 0 <= self.seed <= MAX_SEED:
            raise MVFAError(f"--seed {self.seed} is invalid: use a number from 0 to {MAX_SEED}")
        if self.save_maps is not None and self.save_maps < 0:
            raise MVFAError(f"--save_maps {self.save_maps} is invalid: give no number (every image) or N >= 1")
        if self.train:
            self._validate_training()
        if self.only_normal and (self.train or self.mode != "few-shot" or self.checkpoint is None):
            raise MVFAError("--only_normal is a few-shot test mode: it needs --zero_shot_ckpt (a zero-shot checkpoint) and no training")
        if self.ddp and not (self.mode == "zero-shot" and self.train):
            raise MVFAError("--ddp is for zero-shot training (train_zero.py): other runs train on one support set per rank")
        if self.cuda_graph and not (self.train and self.device.startswith("cuda") and not self.ddp):
            raise MVFAError(f"--cuda_graph replays the training step from CUDA graphs: it needs training on a CUDA "
                            f"device without --ddp (this run: {'training' if self.train else 'a test run'} on "
                            f"{self.device}{', --ddp' if self.ddp else ''}); remove --cuda_graph")

    def _validate_model(self) -> None:
        """The backbone's settings: its config, the CLIP weights' file, the input size and the stages."""
        clip_config = load_config(self.model_name)
        if self.pretrain == OPENAI:  # the CLIP weights are there (read when the model is built)
            resolve_pretrained(clip_config, self.clip_ckpt if self.clip_ckpt is not None else OPENAI)
        vision = clip_config.vision
        if self.img_size < vision.patch_size:
            raise MVFAError(f"--img_size {self.img_size} is invalid: use {vision.patch_size} or more (one patch of "
                            f"{self.model_name} is {vision.patch_size} pixels; the release: 240)")
        stages = list(self.features_list)
        if not stages or sorted(set(stages)) != stages or stages[0] < 1 or stages[-1] > vision.layers:
            raise MVFAError(f"--features_list {' '.join(map(str, stages))} is invalid: give increasing block numbers "
                            f"from 1 to {vision.layers} ({self.model_name} has {vision.layers} blocks; the release: "
                            "6 12 18 24 of ViT-L-14-336's 24)")

    def _validate_training(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise MVFAError(f"--learning_rate {self.learning_rate} is invalid: use a positive finite step "
                            "(the release: 1e-3 few-shot, 1e-4 zero-shot)")
        if not 0.0 < self.target_fpr < 1.0:  # read by --threshold_rule fpr, and by f1 without abnormal valid images
            raise MVFAError(f"--target_fpr {self.target_fpr} is invalid: use a rate between 0 and 1 (e.g. 0.05)")
