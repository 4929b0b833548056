"""The command-line parsers of the commands other than the four scripts (those are in mvfa.cli).

Nothing here imports torch: `mvfa.commands` (the `mvfa` command and every `python -m ...` entry)
builds and parses a command's flags before the command's module is imported, so `--help` and flag
errors answer in a fraction of a second. Choice lists and defaults come from mvfa.choices.

Every flag's help says its default: `HelpFormatter` appends `(default: ...)` where the default is a
value, `(default: off)` to switches and `(required)` to required flags; a flag whose default is None
must say in its help what None means (tests/test_help.py checks every parser for it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mvfa.choices import (
    BENCH_BRAIN_TEST_IMAGES,
    BENCH_SECTIONS,
    DEFAULT_OPSET,
    DEFAULT_SEED_DIR,
    DEMO_DATASETS,
    DEMO_FEW_EPOCHS,
    DEMO_ZERO_EPOCHS,
    DET_LOSS_FORMS,
    PRECISIONS,
    PREFIX_CACHE_MODES,
    PROTOCOLS,
)
from mvfa.paper import PAPER_ROWS

CUDA_GRAPH_HELP = ("training on CUDA: replay each training step from a CUDA graph (one per pattern of runs and "
                   "masks) instead of launching its kernels one by one; equal to the eager step to float rounding; "
                   "not yet run on a GPU in this project's tests (scripts/gpu_graph_step.sh checks it)")
CACHE_DIR_HELP = "on-disk cache of text features (default: $MVFA_CACHE_DIR or ~/.cache/mvfa; 'none' disables)"
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when present, else cpu)"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default; texts of several lines (the examples, the list of
    commands) are kept as written, one-paragraph descriptions are wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or not action.option_strings or "default" in text or action.default == argparse.SUPPRESS:
            return text  # hidden flags, positionals, --help, and helps that state their default already
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # a switch (store_true, store_const)
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return text  # the help says what no value means (checked by tests/test_help.py)
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


HELP_WIDTH = 78  # columns of paragraphs written out before formatting (argparse's own default width)


def new_parser(prog: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A parser with the shared formatter, a one-paragraph description and an epilog of example
    command lines (`examples` start with the command as typed, e.g. f"{prog} --quick")."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


# ------------------------------------------------------------------------------------------------
# mvfa.predict and mvfa.export_onnx


def add_model_flags(parser: argparse.ArgumentParser, runtime: bool = True) -> None:
    """Flags that override the checkpoint's metadata, or stand in for it (release checkpoints).

    runtime False (export): no --device and --precision.
    """
    group = parser.add_argument_group("model (default: the checkpoint's metadata)")
    group.add_argument("--clip_ckpt", default=None,
                       help="CLIP weights (default: the file recorded in the checkpoint when it exists, "
                            "else CLIP/ckpt/<OpenAI file of the model>)")
    group.add_argument("--model_name", default=None, help="CLIP config name or JSON path (default: the checkpoint's)")
    group.add_argument("--img_size", type=int, default=None, help="model input size (default: the checkpoint's)")
    group.add_argument("--features_list", type=int, nargs="+", default=None,
                       help="adapter stages (1-indexed blocks) (default: the checkpoint's)")
    group.add_argument("--prompt_name", default=None,
                       help="object word of the prompts (e.g. 'Brain', 'knee MRI') (default: the checkpoint's)")
    group.add_argument("--has_masks", type=int, choices=(0, 1), default=None,
                       help="1: the adapters were trained with pixel masks (seg maps; few-shot score = max of the map); "
                            "0: without (det scores) (default: the checkpoint's)")
    group.add_argument("--quick_gelu", action="store_true", default=None, help="OpenAI's QuickGELU (default: as trained)")
    if runtime:
        group.add_argument("--device", default=None, help=DEVICE_HELP)
        group.add_argument("--precision", choices=PRECISIONS, default=None,
                           help="autocast on CUDA (default: fp16 there, fp32 on the CPU)")
    group.add_argument("--cache_dir", default=None, help=CACHE_DIR_HELP)


def predict_parser(prog: str = "python -m mvfa.predict") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "Score new images with trained adapters: overlays, a CSV, a decision per image.",
        [
            f"{prog} --ckpt ckpt/few-shot/Knee-4shot-it0-seed111.pth --input new_scans/ --support normal_scans/ "
            "--output_dir predictions/",
            f"{prog} --ckpt ADAPTERS --input new_scans/ --bank bank.pt --output_dir predictions/ --threshold 0.6",
            f"{prog} --ckpt ckpt/zero-shot/Liver.pth --input scan.png --output_dir out/ --model_name ViT-L-14-336 "
            "--img_size 240 --features_list 6 12 18 24 --prompt_name Liver --has_masks 1",
        ],
    )
    parser.add_argument("--ckpt", required=True, help="adapter checkpoint (train_few/train_zero output, or the release's)")
    parser.add_argument("--input", required=True, help="an image, or a folder of images (not searched recursively)")
    parser.add_argument("--output_dir", required=True,
                        help="where predictions.csv, the overlays and predict.json go (a new or empty folder, "
                             "or an earlier run's with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output_dir")
    parser.add_argument("--support", default=None,
                        help="folder of normal images: few-shot scoring (default: none, zero-shot scoring)")
    parser.add_argument("--save_bank", default=None, metavar="PATH",
                        help="with --support: also write the memory bank built from it, for later --bank runs "
                             "(default: not written)")
    parser.add_argument("--bank", default=None, metavar="PATH",
                        help="few-shot scoring from a bank written by --save_bank (instead of --support; "
                             "same checkpoint, CLIP weights and settings) (default: none)")
    parser.add_argument("--masks", default=None,
                        help="folder of masks (by file name or stem) drawn as contours (default: none)")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--no_overlays", action="store_true", help="write the CSV only")
    add_model_flags(parser)
    return parser


def export_onnx_parser(prog: str = "python -m mvfa.export_onnx") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "Export the adapted visual model (frozen CLIP ViT + seg/det adapters) as ONNX "
        "(needs the onnx package: pip install -r requirements-optional.txt).",
        [
            f"{prog} --ckpt ckpt/few-shot/Brain-4shot-it0-seed111.pth --output brain.onnx",
            f"{prog} --ckpt ADAPTERS --output model.onnx --clip_ckpt CLIP/ckpt/ViT-L-14-336px.pt --check",
        ],
    )
    parser.add_argument("--ckpt", required=True, help="adapter checkpoint")
    parser.add_argument("--output", required=True, help="the .onnx file to write (its description goes to <output>.json)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime's tokens with PyTorch's on random images")
    add_model_flags(parser, runtime=False)
    return parser


# ------------------------------------------------------------------------------------------------
# mvfa.reproduce and mvfa.demo


def reproduce_parser(prog: str = "python -m mvfa.reproduce") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "The paper's tables in one command: zero-shot and k-shot runs over support splits, under the "
        "release's protocol and a leak-free one; results.csv and results.md (resumes where it stopped).",
        [
            f"{prog} --data_path ./data/ --output_dir results/reproduce",
            f"{prog} --shots 2 4 8 16 --splits 5 --only_normal",
            "torchrun --nproc_per_node 4 -m mvfa.reproduce --data_path ./data/ --protocols leakfree",
        ],
    )
    protocols = "; ".join(f"{name}: --select {select} --normalize {normalize}" for name, (select, normalize) in PROTOCOLS.items())
    parser.add_argument("--data_path", default="./data/", help="folder holding the <Name>_AD datasets")
    parser.add_argument("--output_dir", default="results/reproduce", help="runs, results.csv and results.md go here")
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(PAPER_ROWS), metavar="NAME",
                        help="restrict to these benchmark datasets, among %(choices)s (default: every one present)")
    parser.add_argument("--shots", type=int, nargs="+", default=[4], help="k of the k-shot runs (the paper: 4)")
    parser.add_argument("--splits", type=int, default=5,
                        help="support splits per k: split 0 is the seed file's line 0 where present, the rest deterministic draws")
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS),
                        help=f"protocols to run ({protocols})")
    parser.add_argument("--only_normal", action="store_true",
                        help="also run normal-only k-shot: k normal images as memory bank with the zero-shot adapters")
    parser.add_argument("--model_name", default="ViT-L-14-336", help="registered CLIP config name or a JSON config path")
    parser.add_argument("--clip_ckpt", default=None, help="CLIP weights (default: CLIP/ckpt/<OpenAI file of --model_name>)")
    parser.add_argument("--pretrain", default="openai", help="openai: load --clip_ckpt; none: random CLIP weights")
    parser.add_argument("--img_size", type=int, default=240, help="model input size")
    parser.add_argument("--features_list", type=int, nargs="+", default=[6, 12, 18, 24], help="adapter stages (1-indexed blocks)")
    parser.add_argument("--epoch", type=int, default=50, help="training epochs of every zero-shot and k-shot run")
    parser.add_argument("--few_learning_rate", type=float, default=1e-3, help="Adam step of the k-shot trainings")
    parser.add_argument("--zero_learning_rate", type=float, default=1e-4, help="Adam step of the zero-shot trainings")
    parser.add_argument("--seed", type=int, default=111, help="seed of every run's draws (and of the random support splits)")
    parser.add_argument("--batch_size", type=int, default=1, help="training batch (1: the release)")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="evaluation batch")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when present, else cpu; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast on CUDA (default: fp16 there, fp32 on the CPU)")
    parser.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--quick_gelu", action="store_true", default=None, help="OpenAI's QuickGELU (the release ran exact GELU)")
    parser.add_argument("--det_loss", choices=DET_LOSS_FORMS, default="release",
                        help="release: the probability passed to BCE-with-logits, as the release; bce: textbook BCE")
    parser.add_argument("--prefix_cache", choices=PREFIX_CACHE_MODES, default="auto",
                        help="keep the frozen blocks' outputs of repeatedly scored images (results are identical)")
    parser.add_argument("--cache_dir", default=None, help=CACHE_DIR_HELP)
    parser.add_argument("--group_size", type=int, default=8,
                        help="runs of one setting (the zero-shot targets; the k-shot splits of every dataset) trained "
                             "in lockstep as one batched computation (1: one by one; each run's results equal its own "
                             "training to float rounding; one process only)")
    parser.add_argument("--cuda_graph", action="store_true", help=CUDA_GRAPH_HELP)
    parser.add_argument("--one_by_one", action="store_true",
                        help="train each protocol's run on its own (default: the protocols of a run share one training "
                             "trajectory; the results are the same, bit for bit)")
    parser.add_argument("--fewshot_seed_dir", action="append", default=None,
                        help=f"folder(s) of <obj>/<k>-shot.txt support lists for split 0 (default: {DEFAULT_SEED_DIR})")
    return parser


def demo_parser(prog: str = "python -m mvfa.demo") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "The whole method in minutes on synthetic data and a tiny random CLIP: few-shot and zero-shot "
        "training and testing, a table beside the paper's, anomaly-map overlays (the pipeline, not the paper's accuracy).",
        [f"{prog}", f"{prog} --quick", f"{prog} --datasets Brain Liver --output_dir demo_small"],
    )
    parser.add_argument("--output_dir", default="demo_output", help="data, checkpoints, results and overlays go here")
    parser.add_argument("--datasets", nargs="+", choices=DEMO_DATASETS, default=list(DEMO_DATASETS), metavar="NAME",
                        help="synthetic datasets to run, among %(choices)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the tiny CLIP")
    parser.add_argument("--few_epochs", type=int, default=DEMO_FEW_EPOCHS, help="training epochs of each few-shot run")
    parser.add_argument("--zero_epochs", type=int, default=DEMO_ZERO_EPOCHS, help="training epochs of each zero-shot run")
    parser.add_argument("--quick", action="store_true", help="a minimal run (fewer images, 1 epoch) for smoke tests")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    return parser


# ------------------------------------------------------------------------------------------------
# mvfa.bench, dataset.prepare, CLIP.convert


def bench_parser(prog: str = "python -m mvfa.bench") -> argparse.ArgumentParser:
    by_device = "(default: set by the device and --smoke; the printed config line shows it)"
    p = new_parser(
        prog, "Speed and memory benchmark of the toolkit: one table, one JSON file (sections: "
        f"{', '.join(BENCH_SECTIONS)}; the module's docstring describes each).",
        [f"{prog} --smoke", f"{prog} --only forward,auroc --json bench.json", f"{prog} --device cuda --full_protocol --json bench.json"],
    )
    p.add_argument("--only", default=None, help=f"comma-separated sections (default: all): {','.join(BENCH_SECTIONS)}")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: a run of seconds")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    p.add_argument("--json", default=None, help="write the configuration, device and rows to this file (default: none)")
    p.add_argument("--full_protocol", action="store_true",
                   help=f"protocol: evaluate all {BENCH_BRAIN_TEST_IMAGES} test images (and, on CPU, all 88/44 support images)")
    p.add_argument("--test_images", type=int, default=None,
                   help="protocol: test images evaluated (default: 16 on the CPU, 512 on CUDA, 6 with --smoke, "
                        f"{BENCH_BRAIN_TEST_IMAGES} with --full_protocol)")
    p.add_argument("--auroc_n", type=int, default=None, help="auroc: number of scores (default: 200 million; --smoke 200,000)")
    p.add_argument("--sklearn_budget_s", type=float, default=None,
                   help="auroc: run sklearn on a subsample (and extrapolate) when all scores would take longer "
                        "(default: 600; --smoke 30)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch (default: the scripts' default)")
    p.add_argument("--forward_batches", default=None, help=f"forward: comma-separated batch sizes {by_device}")
    p.add_argument("--memory_images", default=None, help=f"memory: two test-set sizes, e.g. 8,16 {by_device}")
    p.add_argument("--bank_tokens", type=int, default=None, help=f"memory: bank size of the bank-search check {by_device}")
    p.add_argument("--train_rounds", type=int, default=None, help=f"train_step: interleaved timed steps {by_device}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --smoke: 1)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_args", default=None, help=argparse.SUPPRESS)
    return p


def prepare_parser(prog: str = "python -m dataset.prepare") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "Your own images -> the release's folder layout (<out>/{valid,test}/{good,Ungood}/img), "
        "split deterministically into valid and test.",
        [
            f"{prog} --normal knee/normal --abnormal knee/abnormal --out data/Knee_AD",
            f"{prog} --normal knee/normal --abnormal knee/abnormal --masks knee/masks --mask_suffix _mask "
            "--out data/Knee_AD --valid_fraction 0.3 --link",
        ],
    )
    parser.add_argument("--normal", required=True, help="folder of normal images")
    parser.add_argument("--abnormal", required=True, help="folder of abnormal images")
    parser.add_argument("--masks", default=None,
                        help="folder of masks of the abnormal images (0/255, the image's size) (default: none, no pixel masks)")
    parser.add_argument("--out", required=True, help="the dataset folder to create, named <Name>_AD (e.g. data/Knee_AD)")
    parser.add_argument("--valid_fraction", type=float, default=0.3, help="share of each class put in valid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--link", action="store_true", help="hard-link instead of copying (same file system)")
    parser.add_argument("--mask_suffix", default="",
                        help="mask stems end with this (e.g. _mask: 0001_mask.png is 0001's mask) (default: '', none)")
    parser.add_argument("--binarize_masks", type=int, nargs="?", const=0, default=None, metavar="T",
                        help="convert masks that are not 0/255 (e.g. 0/1 or grey): values > T become 255, others 0 "
                             "(T 0 when the flag is given alone; any channel of a colour mask) (default: none: such "
                             "masks are an error)")
    return parser


def convert_parser(prog: str = "python -m CLIP.convert") -> argparse.ArgumentParser:
    parser = new_parser(
        prog, "Convert OpenAI's TorchScript CLIP archive (or any accepted checkpoint form) "
        "into a plain state dict that loads with torch.load(weights_only=True).",
        [
            f"{prog} CLIP/ckpt/ViT-L-14-336px.pt CLIP/ckpt/ViT-L-14-336.pth",
            f"{prog} old.pt new.pth --force",
        ],
    )
    # positionals: no default to show (tests/test_help.py checks options only for defaults)
    parser.add_argument("input", type=Path, help="checkpoint to read, e.g. CLIP/ckpt/ViT-L-14-336px.pt")
    parser.add_argument("output", type=Path, help="plain state dict to write (torch.save)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return parser
