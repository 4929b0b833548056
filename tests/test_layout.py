"""The code's layout (#15): commands apart from the library, one atomic file writer.

Every module of mvfa/, dataset/ and CLIP/ and the root scripts is parsed (not imported): its imports,
lazy ones inside functions included, and its renames are read from the syntax tree.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mvfa", "dataset", "CLIP")

# Command modules: each parses a command line and runs it. Modules of one family form one command.
COMMANDS = {
    "mvfa.cli": "scripts",
    "mvfa.predict": "predict",
    "mvfa.export_onnx": "export_onnx",
    "mvfa.reproduce": "reproduce",
    "mvfa.demo": "demo",
    "mvfa.commands": "dispatcher",
    "mvfa.__main__": "dispatcher",  # python -m mvfa
    "mvfa.bench": "bench",  # with every module of the mvfa.bench package
    "dataset.prepare": "prepare",
    "CLIP.convert": "convert",
}
DISPATCHER = "mvfa.commands"  # runs every command's main; every command's `python -m` entry goes through it
SCRIPTS_MAIN = "mvfa.cli"  # the root scripts train_*.py / test_*.py call its main functions

ATOMIC_WRITER = "mvfa/runtime/files.py"
# Renames outside mvfa.runtime.files, each a different operation than writing one file whole:
RENAMES_ALLOWED = {
    "dataset/synthetic.py": "a generated dataset folder swapped with the earlier one (folders, not a file)",
    "dataset/prepare.py": "the prepared dataset folder renamed into place whole (a folder, not a file)",
    "mvfa/predict.py": "the output folder replaced whole by its staging folder (a folder, not a file)",
}
RENAMES = ("replace", "rename", "renames")


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    for pattern in ("train_*.py", "test_*.py"):
        for path in sorted(ROOT.glob(pattern)):
            found[path.stem] = path
    return found


MODULES = _modules()
ROOT_SCRIPTS = {name for name, path in MODULES.items() if path.parent == ROOT}


def _family(name: str) -> str:
    if name.startswith("mvfa.bench."):
        return COMMANDS["mvfa.bench"]
    return COMMANDS.get(name, name)


def _is_command(name: str) -> bool:
    return _family(name) != name or name in COMMANDS or name in ROOT_SCRIPTS


def _imported(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from pkg import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES}
    return found - {name}


def test_every_package_is_seen():
    assert {"mvfa.runtime.files", "mvfa.runtime.process", "dataset.medical", "CLIP.model"} <= set(MODULES)
    assert set(COMMANDS) <= set(MODULES) and "mvfa.bench.release" in MODULES
    assert ROOT_SCRIPTS >= {"train_few", "test_few", "train_zero", "test_zero"}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not _is_command(n)))
def test_no_library_module_imports_a_command(name):
    commands = sorted(m for m in _imported(name, MODULES[name]) if _is_command(m))
    assert not commands, f"library module {name} imports the command module(s) {', '.join(commands)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _is_command(n)))
def test_commands_depend_on_the_library_not_on_each_other(name):
    allowed = {DISPATCHER}
    if name == DISPATCHER:
        allowed |= set(COMMANDS)  # it runs every command (their main functions, imported lazily)
    if name in ROOT_SCRIPTS:
        allowed.add(SCRIPTS_MAIN)
    others = sorted(m for m in _imported(name, MODULES[name])
                    if _is_command(m) and m not in allowed and _family(m) != _family(name))
    assert not others, f"command {name} imports the command module(s) {', '.join(others)}"


def _renames(path: Path) -> list[str]:
    """`def write_atomic`, and calls of os.replace / os.rename / os.renames / <path>.replace(...) with one
    argument / <path>.rename(...), as "line: text"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "write_atomic":
            found.append(f"{node.lineno}: def write_atomic")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)) or node.func.attr not in RENAMES:
            continue
        owner = node.func.value
        on_os = isinstance(owner, ast.Name) and owner.id == "os"
        # Path.replace(target) / Path.rename(target): one positional argument (str.replace takes two)
        on_path = node.func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords
        if on_os or on_path:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_one_atomic_file_writer():
    """Files are written whole by mvfa.runtime.files alone; the renames elsewhere are the folder operations listed."""
    misplaced = {}
    for name, path in MODULES.items():
        relative = path.relative_to(ROOT).as_posix()
        if relative == ATOMIC_WRITER or relative in RENAMES_ALLOWED:
            continue
        found = _renames(path)
        if found:
            misplaced[relative] = found
    assert not misplaced, f"write files through mvfa.runtime.files (atomic_target, write_text_atomic, ...): {misplaced}"
    for relative in RENAMES_ALLOWED:
        path = ROOT / relative
        assert not path.exists() or _renames(path), f"{relative} renames nothing: drop it from RENAMES_ALLOWED"
