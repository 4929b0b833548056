"""The `mvfa` command: one entry point for every command of the toolkit.

    mvfa train-few --obj Brain --shot 4         # = python train_few.py --obj Brain --shot 4
    mvfa predict --ckpt ADAPTERS --input scans/ --output_dir out/
    mvfa COMMAND --help                         # the command's flags, each with its default

Each subcommand forwards its arguments unchanged to the `main(argv)` of the command it names. The
command's parser lives in a module without torch (mvfa.cli for the four scripts, mvfa.parsers for
the others) and parses the arguments first, so `--help` and flag errors answer in a fraction of a
second; only then is the command's module (torch and all) imported. `python -m mvfa.predict` and
the other `python -m` entries go the same way (`run_as_module`, called before their heavy imports).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
import importlib
import sys
import textwrap
from typing import NoReturn

from mvfa import cli
from mvfa import parsers


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line summary, its parser's builder and the `module:function` it runs."""

    summary: str
    build_parser: Callable[[str], argparse.ArgumentParser]  # prog -> parser
    target: str  # "module:function", called with the argument list, returns the exit code
    module_prog: str  # how the command is run without the `mvfa` entry point

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    def run(self, argv: list[str], prog: str) -> int:
        """Parse `argv` with the light parser (--help and flag errors exit here), then run the command."""
        self.build_parser(prog).parse_args(argv)
        module_name, function = self.target.split(":")
        return getattr(importlib.import_module(module_name), function)(argv)


def _script(mode: str, train: bool) -> Callable[[str], argparse.ArgumentParser]:
    return lambda prog: cli.build_parser(mode, train, prog)


COMMANDS: dict[str, Command] = {
    "train-few": Command("few-shot training (train_few.py)", _script("few-shot", True),
                         "mvfa.cli:main_train_few", "python train_few.py"),
    "test-few": Command("few-shot testing (test_few.py)", _script("few-shot", False),
                        "mvfa.cli:main_test_few", "python test_few.py"),
    "train-zero": Command("zero-shot (leave-one-out) training (train_zero.py)", _script("zero-shot", True),
                          "mvfa.cli:main_train_zero", "python train_zero.py"),
    "test-zero": Command("zero-shot testing (test_zero.py)", _script("zero-shot", False),
                         "mvfa.cli:main_test_zero", "python test_zero.py"),
    "predict": Command("score new images with trained adapters", parsers.predict_parser,
                       "mvfa.predict:main", "python -m mvfa.predict"),
    "reproduce": Command("the paper's tables over splits, release and leak-free protocols", parsers.reproduce_parser,
                         "mvfa.reproduce:main", "python -m mvfa.reproduce"),
    "demo": Command("the whole method in minutes on synthetic data and a tiny random CLIP", parsers.demo_parser,
                    "mvfa.demo:main", "python -m mvfa.demo"),
    "export-onnx": Command("the adapted visual model as ONNX", parsers.export_onnx_parser,
                           "mvfa.export_onnx:main", "python -m mvfa.export_onnx"),
    "prepare": Command("your own image folders -> the dataset layout", parsers.prepare_parser,
                       "dataset.prepare:main", "python -m dataset.prepare"),
    "convert": Command("OpenAI's TorchScript CLIP file -> a plain state dict", parsers.convert_parser,
                       "CLIP.convert:main", "python -m CLIP.convert"),
    "bench": Command("speed and memory benchmark", parsers.bench_parser, "mvfa.bench:main", "python -m mvfa.bench"),
}
PROG = "mvfa"


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    description = textwrap.fill(
        "MVFA toolkit: medical anomaly detection with CLIP and adapters. Each command takes the flags of "
        f"the script or module it names; `{PROG} COMMAND --help` lists them with their defaults.", parsers.HELP_WIDTH,
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [-h] COMMAND [flags of the command]",
        description=f"{description}\n\ncommands:\n{listing}",
        epilog=f"examples:\n  {PROG} demo --quick\n  {PROG} train-few --obj Brain --shot 4\n"
               f"  {PROG} predict --help",
        formatter_class=parsers.HelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands above")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's flags (see mvfa COMMAND --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `mvfa` console script: `mvfa COMMAND [flags]`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:  # no command: the list of commands, on stderr, and a usage error's exit code
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args.args, f"{PROG} {args.command}")


def run_as_module(name: str) -> NoReturn:
    """`python -m <module>` of command `name`: parse sys.argv with the light parser, then import the
    module under its own name and exit with its main's code. Called from the module's import block
    when it runs as __main__, before torch is imported; the rest of that __main__ copy never runs."""
    command = COMMANDS[name]
    sys.exit(command.run(sys.argv[1:], command.module_prog))


if __name__ == "__main__":
    sys.exit(main())
