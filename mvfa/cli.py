"""The four scripts' command lines: the release's flags (names, meanings, defaults) plus new ones.

`main_train_few(argv)`, `main_test_few(argv)`, `main_train_zero(argv)`, `main_test_zero(argv)` return
an exit code; bad input prints one line `error: ...` on stderr and returns 2, without a traceback.

Under `torchrun --nproc_per_node N` the same commands run as N ranks (mvfa.runtime.distributed): the
evaluation is sharded with the single-process results, rank 0 prints and writes. A rank that fails
prints its error (a user error in one line, anything else with its traceback) and leaves at once
with exit code 2 or 1, so that torchrun stops the job instead of the other ranks waiting.

`--config FILE` reads flag values from a JSON object (keys: the flag names without dashes) as the
parser's defaults, so flags on the command line win; after a run, `<output_dir>/run_config.json`
holds every listed flag's final value, and `--config` of that file repeats the run.

This module imports no torch: the parser is built and parsed (and --help answered) first; the
engine, torch and the process group are imported by the functions that run after parsing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
from typing import TYPE_CHECKING

from mvfa.choices import (
    CALIBRATION_RULES,
    DEFAULT_SEED_DIR,
    DEFAULT_TIMEOUT_S,
    DET_LOSS_FORMS,
    EVAL_SCHEDULES,
    NORMALIZATIONS,
    ORDERS,
    PRECISIONS,
    PREFIX_CACHE_MODES,
    SCORING_DTYPES,
    SELECTIONS,
)
from mvfa.parsers import CUDA_GRAPH_HELP, new_parser
from mvfa.runs.run_log import LOGGERS
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.process import INTERRUPTED, USER_ERRORS  # noqa: F401 - the scripts' exit code on Ctrl-C and their user errors
from mvfa.runtime.process import guarded, resolve_cache_dir, resolve_device, resolve_precision

if TYPE_CHECKING:
    from mvfa.runtime.distributed import Dist
    from mvfa.runs.config import RunConfig

RELEASE_DEFAULTS = {
    "few-shot": {"obj": "Liver", "learning_rate": 1e-3, "save_path": "./ckpt/few-shot/"},
    "zero-shot": {"obj": "Retina_RESC", "learning_rate": 1e-4, "save_path": "./ckpt/zero-shot/"},
}
RUN_CONFIG_FILE = "run_config.json"  # every flag of a run, as parsed: `--config` repeats the run
NOT_A_FLAG = ("help", "config")  # destinations a --config file cannot set
# Example command lines of each script's --help (after the script's name).
EXAMPLES = {
    ("few-shot", True): [
        "--obj Brain --shot 4",
        '--obj Knee --prompt_name "knee MRI" --shot 4 --select valid',
        "--config results/few-shot/Brain/train-4shot-it0-seed111/run_config.json --seed 112",
    ],
    ("few-shot", False): [
        "--obj Brain --shot 4",
        "--obj Brain --shot 4 --normalize checkpoint --save_maps 5",
        "--obj Brain --only_normal --zero_shot_ckpt ckpt/zero-shot/Brain-zero-seed111.pth",
    ],
    ("zero-shot", True): [
        "--obj Liver",
        "--obj Liver --select valid --order sorted",
        "--config results/zero-shot/Liver/train-zero-seed111/run_config.json --output_dir results/again",
    ],
    ("zero-shot", False): [
        "--obj Liver",
        "--obj Liver --checkpoint ckpt/zero-shot/Liver.pth --save_maps",
    ],
}


class Repeatable(argparse.Action):
    """`action="append"` whose command-line values replace the default instead of extending it, so
    that a list given in a --config file is overridden, not added to, by the flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])


def script_name(mode: str, train: bool) -> str:
    return ("train" if train else "test") + ("_few" if mode == "few-shot" else "_zero") + ".py"


def build_parser(mode: str, train: bool, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of one of the four scripts (`prog`: the name shown in usage and examples).

    Test scripts accept the release's training flags (--epoch, --learning_rate, --batch_size,
    --save_model, --select, --det_loss: its test scripts took them) but do not list them: they
    change nothing in a test run.
    """
    defaults = RELEASE_DEFAULTS[mode]
    prog = prog or script_name(mode, train)
    typed = f"python {prog}" if prog.endswith(".py") else prog  # the examples as typed
    parser = new_parser(
        prog,
        f"MVFA {mode} {'training' if train else 'testing'} (flags of the release, plus new ones). Results go to "
        f"--output_dir: metrics.json, predictions.csv, {RUN_CONFIG_FILE} (every flag of the run: --config "
        "repeats it), " + ("train_log.csv; adapters to --save_path." if train else "and with --save_maps overlays."),
        [f"{typed} {line}" for line in EXAMPLES[(mode, train)]],
    )
    training_only = (lambda text: text) if train else (lambda text: argparse.SUPPRESS)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"JSON file of flag values (keys: flag names without dashes, as in a run's {RUN_CONFIG_FILE}) "
                             "used as defaults; flags given on the command line override them (default: none)")
    release = parser.add_argument_group("the release's flags")
    several = ("those datasets trained together in lockstep" if train else "each tested in turn on one model") + \
        " (one process; with --output_dir each run writes to <output_dir>/<obj>)"
    release.add_argument("--obj", nargs="+", default=[defaults["obj"]],
                         help=f"dataset name: <data_path>/<obj>_AD; several: {several}")
    release.add_argument("--data_path", default="./data/", help="folder holding the <Name>_AD datasets")
    release.add_argument("--img_size", type=int, default=240, help="model input size in pixels")
    release.add_argument("--features_list", type=int, nargs="+", default=[6, 12, 18, 24], help="adapter stages (1-indexed blocks)")
    if train:
        seed_help = "seed of the release's draws (initial adapters, epoch orders) and of random support draws"
    elif mode == "few-shot":
        seed_help = "seed of a random support draw (--iterate -1) and in the checkpoint's name"
    else:
        seed_help = "seed in the checkpoint's name <obj>-zero-seed<seed>.pth"
    release.add_argument("--seed", type=int, default=111, help=seed_help)
    release.add_argument("--batch_size", type=int, default=1, help=training_only("training batch size (the release: 1)"))
    release.add_argument("--save_path", default=defaults["save_path"],
                         help="folder the adapter checkpoints are written to" if train else
                         "folder the adapter checkpoint is read from (<obj>-<run tag>.pth, else the release's <obj>.pth)")
    release.add_argument("--save_model", type=int, default=1, help=training_only("1: save the selected adapters"))
    release.add_argument("--model_name", default="ViT-L-14-336",
                         help="registered CLIP config name (CLIP/model_configs) or a JSON config path")
    release.add_argument("--pretrain", default="openai", help="openai: load --clip_ckpt; none: random CLIP weights")
    release.add_argument("--epoch", type=int, default=50, help=training_only("training epochs"))
    release.add_argument("--learning_rate", type=float, default=defaults["learning_rate"],
                         help=training_only("Adam step (betas 0.5, 0.999)"))
    if mode == "few-shot":
        release.add_argument("--shot", type=int, default=4, help="k abnormal and k normal support images")
        several = "those splits trained together in lockstep" if train else "each split's checkpoint tested in turn"
        release.add_argument("--iterate", type=int, nargs="+", default=[0],
                             help=f"seed-file line; -1: a random draw from --seed; several: {several} (one process; "
                                  "with --output_dir each run writes to <output_dir>/iterate<i>)")

    added = parser.add_argument_group("added flags")
    added.add_argument("--clip_ckpt", default=None, help="CLIP weights (default: CLIP/ckpt/<OpenAI file of --model_name>)")
    added.add_argument("--output_dir", default=None,
                       help="where metrics.json, predictions.csv and logs go "
                            f"(default: results/{mode}/<obj>/{'train' if train else 'test'}-<run tag>)")
    added.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    added.add_argument("--precision", choices=PRECISIONS, default=None, help="autocast on CUDA (default: fp16 there, fp32 on CPU)")
    added.add_argument("--scoring_dtypes", choices=SCORING_DTYPES, default="release",
                       help="CUDA with --precision fp16/bf16: release (the release's dtypes: memory bank forward in fp32 "
                            "without autocast, text features and scoring under autocast) or fp32 (scoring in fp32 "
                            "after the autocast forward); no effect on the CPU")
    added.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    added.add_argument("--eval_batch_size", type=int, default=8, help="evaluation batch size")
    added.add_argument("--select", choices=SELECTIONS, default="test",
                       help=training_only("model selection: test (the release; uses test labels), valid (held-out), last"))
    added.add_argument("--prompt_name", default=None,
                       help="object word for the prompts of a dataset not in the registry (default: the registered word of --obj)")
    added.add_argument("--quick_gelu", action="store_true", default=None, help="OpenAI's QuickGELU (the release ran exact GELU)")
    added.add_argument("--prefix_cache", choices=PREFIX_CACHE_MODES, default="auto",
                       help="keep the frozen blocks' outputs of repeatedly scored images (results are identical)")
    added.add_argument("--cache_dir", default=None,
                       help="on-disk cache of text features (default: $MVFA_CACHE_DIR or ~/.cache/mvfa; 'none' disables)")
    added.add_argument("--det_loss", choices=DET_LOSS_FORMS, default="release",
                       help=training_only("release: the probability passed to BCE-with-logits, as the release; bce: textbook BCE"))
    added.add_argument("--compile", action="store_true",
                       help="torch.compile the adapted model's forward (inductor; results agree with the eager run to "
                            "float rounding, not bit for bit; the first batches of each shape pay the compilation)")
    if train:
        added.add_argument("--cuda_graph", action="store_true", help=CUDA_GRAPH_HELP)
    added.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="under torchrun: seconds a rank may wait in one collective before the job fails")
    if mode == "zero-shot" and train:
        added.add_argument("--order", choices=ORDERS, default="release",
                           help="order of each source's images before the release's shuffles: release (the file "
                                "system's listing, as the release read it; replays exactly only on the same file "
                                "system) or sorted (by name, the same everywhere)")
        added.add_argument("--listings", default=None, metavar="JSON",
                           help="replay a run recorded elsewhere: a JSON mapping image folders (relative to "
                                "--data_path) to their file names in the recorded listing order (default: none)")
        added.add_argument("--eval_schedule", choices=EVAL_SCHEDULES, default="release",
                           help="when the target is scored for selection: release (before steps 0, N//5, 2N//5, ... "
                                "of each epoch, the latest tie wins) or final (after steps N/5, ..., N: the last "
                                "evaluation scores the final adapters; the earliest tie wins)")
        added.add_argument("--ddp", action="store_true",
                           help="under torchrun: data-parallel training, each rank a part of every batch "
                                "(effective batch: ranks x --batch_size); default: every rank trains the release's batches")
    if mode == "few-shot":
        added.add_argument("--fewshot_seed_dir", action=Repeatable, default=None,
                           help=f"folder of <obj>/<k>-shot.txt support lists (default: {DEFAULT_SEED_DIR}); repeatable")
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
                           help="write anomaly-map overlays to <output_dir>/maps: every test image, or the N highest- "
                                "and N lowest-scoring (default: no overlays)")
        if mode == "few-shot":
            added.add_argument("--only_normal", action="store_true",
                               help="normal-only few-shot: the k normal support images as memory bank, the adapters of "
                                    "--zero_shot_ckpt, no abnormal image and no training")
            added.add_argument("--zero_shot_ckpt", default=None,
                               help="--only_normal: the zero-shot adapter checkpoint of --obj (default: none)")
    return parser


# ------------------------------------------------------------------------------------------------
# --config FILE and run_config.json


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Destination -> action of every flag a --config file may set (all but --help and --config)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_A_FLAG}


def run_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The listed flags of the run and their final values (what run_config.json holds)."""
    return {dest: getattr(args, dest) for dest, action in flag_actions(parser).items() if action.help != argparse.SUPPRESS}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _json_kind(value) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _item(value, kind: type):
    """`value` as a `kind` flag value (an int for a float flag becomes a float); None when it is not one."""
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else None


def config_value(key: str, value, action: argparse.Action, source: str):
    """A --config file's `value` for flag `key`, checked against the flag's type, arity and choices."""
    kind = action.type or str
    many = action.nargs in ("+", "*") or isinstance(action, Repeatable)
    if action.nargs == 0:
        expected = "true or false"
    elif many:
        expected = f"a list of {'strings' if kind is str else 'integers' if kind is int else 'numbers'}"
    else:
        expected = _TYPE_NAMES.get(kind, kind.__name__)
    if action.choices is not None:
        expected += f" among {', '.join(map(str, action.choices))}"
    if action.default is None:
        expected += " or null"
    if value is None and action.default is None:
        return None
    if action.nargs == 0:
        checked = value if isinstance(value, bool) else None
    elif many:
        listed = [value] if value is not None and not isinstance(value, list) else value  # one value: a list of one
        items = [_item(v, kind) for v in listed] if isinstance(listed, list) and (listed or action.nargs != "+") else None
        checked = items if items is not None and all(v is not None for v in items) else None
    else:
        checked = _item(value, kind)
    chosen = checked if isinstance(checked, list) else [checked]
    if checked is None or (action.choices is not None and not all(v in action.choices for v in chosen)):
        raise MVFAError(f"--config {source}: {key} must be {expected}, found {json.dumps(value)} ({_json_kind(value)})")
    return checked


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The flag values of a --config JSON file, checked: one MVFAError line names what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MVFAError(f"--config {path}: no such file (expected a JSON file of flag values, e.g. a run's {RUN_CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MVFAError(f"--config {path} is not readable ({type(err).__name__}: {getattr(err, 'strerror', None) or err})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise MVFAError(f"--config {path} is not JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                        'expected an object of flag values, e.g. {"epoch": 5}') from None
    if not isinstance(values, dict):
        raise MVFAError(f'--config {path} must hold a JSON object of flag values (e.g. {{"epoch": 5}}), found {_json_kind(values)}')
    actions = flag_actions(parser)
    unknown = [key for key in values if key not in actions]
    if unknown:
        listed = [dest for dest, action in actions.items() if action.help != argparse.SUPPRESS]
        raise MVFAError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"{parser.prog} takes {', '.join(listed)}")
    return {key: config_value(key, value, actions[key], path) for key, value in values.items()}


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; with --config FILE its values become the defaults and the command line is parsed
    again, so that the flags given explicitly win."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    parser.set_defaults(**read_config_file(args.config, parser))
    return parser.parse_args(argv)


def write_run_config(output_dir: Path, flags: dict) -> Path:
    from mvfa.runtime.files import write_text_atomic  # imports torch: only once a run has happened

    path = Path(output_dir) / RUN_CONFIG_FILE
    write_text_atomic(path, json.dumps(flags, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# A run


def configs_from_args(args: argparse.Namespace, mode: str, train: bool, device: str | None = None) -> list[RunConfig]:
    """One run's settings per --obj and --iterate value (several: the training scripts train them in
    lockstep, the test scripts test them in turn); with --output_dir, each run of several writes to
    <output_dir>[/<obj>][/iterate<i>]."""
    objs = args.obj if isinstance(args.obj, list) else [args.obj]
    iterates = getattr(args, "iterate", None)
    iterates = iterates if isinstance(iterates, list) else [None]
    if len(objs) > 1 and args.prompt_name:
        raise MVFAError(f"--prompt_name names one dataset's object and --obj gives {len(objs)} datasets: "
                        "run them one by one, or drop --prompt_name for registered datasets")
    runs = len(objs) * len(iterates)
    if not train and runs > 1 and args.checkpoint:
        raise MVFAError(f"--checkpoint names one file and --obj/--iterate give {runs} runs: test them one by one, "
                        "or drop --checkpoint to read each run's own from --save_path")
    if not train and len(objs) > 1 and getattr(args, "zero_shot_ckpt", None):
        raise MVFAError(f"--zero_shot_ckpt is the zero-shot checkpoint of one dataset and --obj gives {len(objs)}: "
                        "test the datasets one by one")
    configs = []
    for obj in objs:
        for iterate in iterates:
            config = config_from_args(args, mode, train, device, iterate, obj)
            if args.output_dir and (len(objs) > 1 or len(iterates) > 1):
                folder = Path(args.output_dir) / obj if len(objs) > 1 else Path(args.output_dir)
                config.output_dir = folder / f"iterate{config.iterate}" if len(iterates) > 1 else folder
            configs.append(config)
    return configs


def config_from_args(
    args: argparse.Namespace, mode: str, train: bool, device: str | None = None, iterate: int | None = None,
    obj: str | None = None,
) -> RunConfig:
    """The run's settings from the flags; `device` (a torchrun rank's own device) overrides --device,
    `iterate` the first --iterate value, `obj` the first --obj value."""
    from mvfa.runs.config import RunConfig

    device = resolve_device(device if device is not None else args.device)
    precision = resolve_precision(args.precision, device)
    shot = getattr(args, "shot", 0)
    if iterate is None:
        iterate = getattr(args, "iterate", -1)
        iterate = iterate[0] if isinstance(iterate, list) else iterate
    if obj is None:
        obj = args.obj[0] if isinstance(args.obj, list) else args.obj
    config = RunConfig(
        mode=mode,
        train=train,
        obj=obj,
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
        cache_dir=resolve_cache_dir(args.cache_dir),
        compile=args.compile,
        cuda_graph=bool(getattr(args, "cuda_graph", False)),
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
    config.output_dir = Path(args.output_dir) if args.output_dir else Path("results") / mode / obj / f"{stage}-{config.run_tag()}"
    return config


def main(mode: str, train: bool, argv: list[str] | None = None) -> int:
    """Parse the flags (and a --config file), run, and write <output_dir>/run_config.json after the run."""
    parser = build_parser(mode, train)
    try:
        args = parse_flags(parser, argv)
    except MVFAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = run_flags(parser, args)

    def work(dist: Dist, device: str | None) -> None:
        from mvfa.runs.run import run_grouped

        configs = configs_from_args(args, mode, train, device)
        run_grouped([[config] for config in configs], dist)  # several: trained in lockstep, or tested in turn
        if dist.is_main:
            for config in configs:  # each folder's flags re-run its own run
                own = flags
                if len(configs) > 1:
                    own = {**flags, "obj": [config.obj], "output_dir": str(config.output_dir)}
                    if "iterate" in flags:
                        own["iterate"] = [config.iterate]
                write_run_config(config.output_dir, own)

    return guarded(work, args.device, args.dist_timeout)


def main_train_few(argv: list[str] | None = None) -> int:
    return main("few-shot", True, argv)


def main_test_few(argv: list[str] | None = None) -> int:
    return main("few-shot", False, argv)


def main_train_zero(argv: list[str] | None = None) -> int:
    return main("zero-shot", True, argv)


def main_test_zero(argv: list[str] | None = None) -> int:
    return main("zero-shot", False, argv)
