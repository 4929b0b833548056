"""`pip install .` works: the package data and the `mvfa` entry point are installed, and the commands
run from another folder with only the installed tree on the path.

The install goes to a temporary --target without dependencies or build isolation (no network; the
running environment's setuptools builds it), from a copy of the working tree's files, so the
source folder gets no build/ or *.egg-info. About 5 s on a quiet 2-core machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "build", "*.egg-info", "data", "ckpt",
                                 "results", "runs", "demo_output", "*.pt", "*.pth", ".whl", ".gl")
PACKAGE_DATA = (
    "CLIP/model_configs/ViT-L-14-336.json",
    "CLIP/model_configs/ViT-Tiny-14.json",
    "CLIP/bpe_simple_vocab_16e6.txt.gz",
    "CLIP/BPE_VOCAB_LICENSE.txt",
    "dataset/fewshot_seed/README.md",
    "dataset/fewshot_seed/Brain/4-shot.txt",
    "dataset/fewshot_seed/Retina_OCT2017/16-shot.txt",
    "mvfa/commands.py",
    "loss.py",
    "prompt.py",
    "utils.py",
)


def source_copy(target: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored ones: never data or weights)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: everything but the usual data, weight and build folders
        shutil.copytree(REPO, target, ignore=SKIPPED)
        return target
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    source = source_copy(root / "src")
    site = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("pip is not available to this interpreter")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A command with only the installed tree on the path (not the repository), from `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_package_data_and_entry_point_are_installed(installed):
    missing = [name for name in PACKAGE_DATA if not (installed / name).is_file()]
    assert not missing
    assert not (installed / "tests").exists() and not (installed / "train_few.py").exists()
    entry_points = next(installed.glob("mvfa_toolkit-*.dist-info")) / "entry_points.txt"
    assert "mvfa = mvfa.commands:main" in entry_points.read_text()
    assert (installed / "bin" / "mvfa").is_file()


def test_commands_run_from_another_folder(installed, tmp_path):
    done = run_installed(installed, tmp_path, "-m", "mvfa.commands", "--help")
    assert done.returncode == 0 and "train-few" in done.stdout and "export-onnx" in done.stdout, done.stderr
    done = run_installed(installed, tmp_path, str(installed / "bin" / "mvfa"), "predict", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: mvfa predict"), done.stderr
    done = run_installed(installed, tmp_path, "-m", "mvfa.predict", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m mvfa.predict"), done.stderr
    done = run_installed(installed, tmp_path, "-m", "mvfa.bench", "--help")
    assert done.returncode == 0 and "--only" in done.stdout, done.stderr


def test_every_subpackage_is_installed(installed):
    """The library's subpackages and the benchmark's modules are in the installed tree."""
    for package in ("mvfa/method", "mvfa/calibration", "mvfa/runs", "mvfa/runtime", "mvfa/bench"):
        sources = {p.name for p in (REPO / package).glob("*.py")}
        assert sources and sources == {p.name for p in (installed / package).glob("*.py")}, package


def test_package_files_are_found_relative_to_the_package(installed, tmp_path):
    """Model configs, the BPE vocabulary and the shipped support lists come from the installed tree,
    whatever the working folder."""
    code = (
        "import CLIP.config, CLIP.tokenizer, mvfa.choices\n"
        "from CLIP import list_models\n"
        "print(CLIP.config.CONFIG_DIR); print(CLIP.tokenizer.DEFAULT_BPE_PATH); print(mvfa.choices.DEFAULT_SEED_DIR)\n"
        "print(' '.join(list_models()))"
    )
    done = run_installed(installed, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    config_dir, bpe, seed_dir, models = done.stdout.splitlines()
    for path in (config_dir, bpe, seed_dir):
        assert Path(path).exists() and Path(path).resolve().is_relative_to(installed.resolve()), path
    assert "ViT-L-14-336" in models.split()


def requirement_lines(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dependencies_repeat_the_requirement_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines("requirements.txt")
    assert project["optional-dependencies"]["test"] == requirement_lines("requirements-test.txt")
    assert project["optional-dependencies"]["onnx"] == requirement_lines("requirements-optional.txt")
    assert project["scripts"] == {"mvfa": "mvfa.commands:main"}
