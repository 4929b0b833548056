"""The four scripts' command lines: the release's flags (names, meanings, defaults) plus new ones.

`main_train_few(argv)`, `main_test_few(argv)`, `main_train_zero(argv)`, `main_test_zero(argv)` return
an exit code; bad input prints one line `error: ...` on stderr and returns 2, without a traceback.

Under `torchrun --nproc_per_node N` the same commands run as N ranks (mvfa.distributed): the
evaluation is sharded with the single-process results, rank 0 prints and writes. A rank that fails
prints its error (a user error in one line, anything else with its traceback) and leaves at once
with exit code 2 or 1, so that torchrun stops the job instead of the other ranks waiting.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from CLIP.errors import CLIPError
from dataset.errors import DatasetError

from .engine import (
    CALIBRATION_RULES,
    DEFAULT_SEED_DIR,
    NORMALIZATIONS,
    ORDERS,
    PRECISIONS,
    PREFIX_CACHE_MODES,
    SCORING_DTYPES,
    SELECTIONS,
    RunConfig,
    run,
)
from .distributed import DEFAULT_TIMEOUT_S, Dist, fail, process_group
from .errors import MVFAError
from .losses import DET_LOSS_FORMS
from .run_log import LOGGERS
from .training import EVAL_SCHEDULES
from .text import default_cache_dir

USER_ERRORS = (CLIPError, DatasetError, MVFAError)
INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
RELEASE_DEFAULTS = {
    "few-shot": {"obj": "Liver", "learning_rate": 1e-3, "save_path": "./ckpt/few-shot/"},
    "zero-shot": {"obj": "Retina_RESC", "learning_rate": 1e-4, "save_path": "./ckpt/zero-shot/"},
}


def build_parser(mode: str, train: bool) -> argparse.ArgumentParser:
    defaults = RELEASE_DEFAULTS[mode]
    script = ("train" if train else "test") + ("_few" if mode == "few-shot" else "_zero") + ".py"
    parser = argparse.ArgumentParser(
        prog=script,
        description=f"MVFA {mode} {'training' if train else 'testing'} (flags of the release, plus new ones).",
    )
    release = parser.add_argument_group("the release's flags")
    release.add_argument("--obj", default=defaults["obj"], help="dataset name: <data_path>/<obj>_AD")
    release.add_argument("--data_path", default="./data/", help="folder holding the <Name>_AD datasets")
    release.add_argument("--img_size", type=int, default=240)
    release.add_argument("--features_list", type=int, nargs="+", default=[6, 12, 18, 24], help="adapter stages (1-indexed blocks)")
    release.add_argument("--seed", type=int, default=111)
    release.add_argument("--batch_size", type=int, default=1, help="training batch size (the release: 1)")
    release.add_argument("--save_path", default=defaults["save_path"], help="adapter checkpoints folder")
    release.add_argument("--save_model", type=int, default=1, help="1: save the selected adapters (training)")
    release.add_argument("--model_name", default="ViT-L-14-336", help="registered config name or a JSON config path")
    release.add_argument("--pretrain", default="openai", help="openai: load --clip_ckpt; none: random CLIP weights")
    release.add_argument("--epoch", type=int, default=50)
    release.add_argument("--learning_rate", type=float, default=defaults["learning_rate"])
    if mode == "few-shot":
        release.add_argument("--shot", type=int, default=4, help="k abnormal and k normal support images")
        release.add_argument("--iterate", type=int, default=0, help="seed-file line; -1: a random draw from --seed")

    added = parser.add_argument_group("added flags")
    added.add_argument("--clip_ckpt", default=None, help="CLIP weights (default: CLIP/ckpt/<OpenAI file of --model_name>)")
    added.add_argument("--output_dir", default=None, help="where metrics.json, predictions.csv and logs go")
    added.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    added.add_argument("--precision", choices=PRECISIONS, default=None, help="autocast on CUDA (default fp16 there, fp32 on CPU)")
    added.add_argument("--scoring_dtypes", choices=SCORING_DTYPES, default="release",
                       help="CUDA with --precision fp16/bf16: release (the release's dtypes: memory bank forward in fp32 "
                            "without autocast, text features and scoring under autocast) or fp32 (scoring in fp32 "
                            "after the autocast forward); no effect on the CPU")
    added.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    added.add_argument("--eval_batch_size", type=int, default=8)
    added.add_argument("--select", choices=SELECTIONS, default="test",
                       help="model selection: test (the release; uses test labels), valid (held-out), last")
    added.add_argument("--prompt_name", default=None, help="object word for the prompts of a dataset not in the registry")
    added.add_argument("--quick_gelu", action="store_true", default=None, help="OpenAI's QuickGELU (the release ran exact GELU)")
    added.add_argument("--prefix_cache", choices=PREFIX_CACHE_MODES, default="auto",
                       help="keep the frozen blocks' outputs of repeatedly scored images (results are identical)")
    added.add_argument("--cache_dir", default=None,
                       help="on-disk cache of text features (default $MVFA_CACHE_DIR or ~/.cache/mvfa; 'none' disables)")
    added.add_argument("--det_loss", choices=DET_LOSS_FORMS, default="release", help="release: probability into BCE-with-logits")
    added.add_argument("--compile", action="store_true",
                       help="torch.compile the adapted model's forward (inductor; results agree with the eager run to "
                            "float rounding, not bit for bit; the first batches of each shape pay the compilation)")
    added.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="under torchrun: seconds a rank may wait in one collective before the job fails")
    if mode == "zero-shot" and train:
        added.add_argument("--order", choices=ORDERS, default="release",
                           help="order of each source's images before the release's shuffles: release (the file "
                                "system's listing, as the release read it; replays exactly only on the same file "
                                "system) or sorted (by name, the same everywhere)")
        added.add_argument("--listings", default=None, metavar="JSON",
                           help="replay a run recorded elsewhere: a JSON mapping image folders (relative to "
                                "--data_path) to their file names in the recorded listing order")
        added.add_argument("--eval_schedule", choices=EVAL_SCHEDULES, default="release",
                           help="when the target is scored for selection: release (before steps 0, N//5, 2N//5, ... "
                                "of each epoch, the latest tie wins) or final (after steps N/5, ..., N: the last "
                                "evaluation scores the final adapters; the earliest tie wins)")
        added.add_argument("--ddp", action="store_true",
                           help="under torchrun: data-parallel training, each rank a part of every batch "
                                "(effective batch: ranks x --batch_size); default: every rank trains the release's batches")
    if mode == "few-shot":
        added.add_argument("--fewshot_seed_dir", action="append", default=None,
                           help=f"folder of <obj>/<k>-shot.txt support lists (default {DEFAULT_SEED_DIR}); repeatable")
    if train:
        added.add_argument("--logger", choices=LOGGERS, default="none",
                           help="also send the training curves (loss per step, every evaluation) to tensorboard "
                                "(<output_dir>/tensorboard; needs the tensorboard package)")
        added.add_argument("--threshold_rule", choices=CALIBRATION_RULES, default="f1",
                           help="after training, fit normalisation statistics on valid normal images (not the support) "
                                "and choose a threshold on valid data: f1 (best F1), fpr (--target_fpr of valid normal "
                                "images flagged), none (no calibration); stored in the checkpoint")
        added.add_argument("--target_fpr", type=float, default=0.05, help="--threshold_rule fpr: the flagged share of normal images")
        added.add_argument("--overwrite", action="store_true",
                           help="replace a checkpoint of the same name made with other settings (default: refused)")
    else:
        added.add_argument("--checkpoint", default=None, help="adapter checkpoint to test (default: found in --save_path)")
        added.add_argument("--normalize", choices=NORMALIZATIONS, default="test",
                           help="test: min-max over the test set (the release); valid: fitted on valid normal images "
                                "(not the support); checkpoint: the statistics stored at training")
        added.add_argument("--save_maps", type=int, nargs="?", const=0, default=None, metavar="N",
                           help="write anomaly-map overlays to <output_dir>/maps: every test image, or the N highest- and N lowest-scoring")
        if mode == "few-shot":
            added.add_argument("--only_normal", action="store_true",
                               help="normal-only few-shot: the k normal support images as memory bank, the adapters of "
                                    "--zero_shot_ckpt, no abnormal image and no training")
            added.add_argument("--zero_shot_ckpt", default=None, help="--only_normal: the zero-shot adapter checkpoint of --obj")
    return parser


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MVFAError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MVFAError(f"--device {requested} was asked for, but no CUDA device is available: use --device cpu")
    return device


def config_from_args(args: argparse.Namespace, mode: str, train: bool, device: str | None = None) -> RunConfig:
    """The run's settings from the flags; `device` (a torchrun rank's own device) overrides --device."""
    device = resolve_device(device if device is not None else args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    shot = getattr(args, "shot", 0)
    iterate = getattr(args, "iterate", -1)
    config = RunConfig(
        mode=mode,
        train=train,
        obj=args.obj,
        data_path=Path(args.data_path),
        save_path=Path(args.save_path),
        output_dir=Path("."),  # set below, once the run tag is known
        model_name=args.model_name,
        clip_ckpt=Path(args.clip_ckpt) if args.clip_ckpt else None,
        pretrain=args.pretrain,
        img_size=args.img_size,
        features_list=tuple(args.features_list),
        shot=shot,
        iterate=iterate,
        seed=args.seed,
        epoch=args.epoch,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        save_model=bool(args.save_model),
        select=args.select,
        prompt_name=args.prompt_name,
        device=str(device),
        precision=precision,
        num_workers=args.num_workers,
        quick_gelu=args.quick_gelu,
        det_loss=args.det_loss,
        prefix_cache=args.prefix_cache,
        cache_dir=None if args.cache_dir == "none" else Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        compile=args.compile,
        scoring_dtypes=args.scoring_dtypes,
    )
    if mode == "few-shot":
        config.fewshot_seed_dirs = tuple(Path(p) for p in (args.fewshot_seed_dir or [DEFAULT_SEED_DIR]))
    if not train and args.checkpoint:
        config.checkpoint = Path(args.checkpoint)
    if train:
        config.threshold_rule, config.target_fpr = args.threshold_rule, args.target_fpr
        config.ddp = bool(getattr(args, "ddp", False))
        config.logger, config.overwrite = args.logger, args.overwrite
        if mode == "zero-shot":
            config.order, config.eval_schedule = args.order, args.eval_schedule
            config.listings = Path(args.listings) if args.listings else None
    else:
        config.normalize, config.save_maps = args.normalize, args.save_maps
        if getattr(args, "only_normal", False):
            if not args.zero_shot_ckpt or args.checkpoint:
                raise MVFAError("--only_normal needs --zero_shot_ckpt PATH (a zero-shot checkpoint of --obj), and no --checkpoint")
            config.only_normal, config.checkpoint = True, Path(args.zero_shot_ckpt)
        elif getattr(args, "zero_shot_ckpt", None):
            raise MVFAError("--zero_shot_ckpt is used with --only_normal only")
    stage = "train" if train else "test"
    config.output_dir = Path(args.output_dir) if args.output_dir else Path("results") / mode / args.obj / f"{stage}-{config.run_tag()}"
    return config


def guarded(work: Callable[[Dist, str | None], None], device: str | None, timeout_s: float, backend: str | None = None) -> int:
    """Run `work(dist, device)` inside the process group (none outside torchrun); the exit code.

    A user error prints one line `error: ...` and gives 2. With several ranks any failure ends this
    process at once, before the process group's teardown (mvfa.distributed.fail), so that no rank
    waits for it in a collective.
    """
    try:
        with process_group(device, timeout_s, backend) as (dist, rank_device):
            try:
                work(dist, rank_device)
            except USER_ERRORS as err:
                if dist.active:
                    fail(dist, f"error: {one_line(err)}", 2)
                raise
            except BaseException:
                if dist.active:
                    fail(dist, traceback.format_exc(), 1)
                raise
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written whole or not at all: nothing half-written remains
        print("error: interrupted: files of this run being written were discarded; earlier results are intact",
              file=sys.stderr)
        return INTERRUPTED
    return 0


def one_line(err: Exception) -> str:
    """The user error's message; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): its
    last line holds the message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(mode: str, train: bool, argv: list[str] | None = None) -> int:
    args = build_parser(mode, train).parse_args(argv)
    return guarded(lambda dist, device: run(config_from_args(args, mode, train, device), dist), args.device, args.dist_timeout)


def main_train_few(argv: list[str] | None = None) -> int:
    return main("few-shot", True, argv)


def main_test_few(argv: list[str] | None = None) -> int:
    return main("few-shot", False, argv)


def main_train_zero(argv: list[str] | None = None) -> int:
    return main("zero-shot", True, argv)


def main_test_zero(argv: list[str] | None = None) -> int:
    return main("zero-shot", False, argv)
