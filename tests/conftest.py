"""Shared fixtures: the golden parity fixture from ../shared (skipped when absent), and the pieces
several modules build once per session and only read: the seeded tiny random CLIP, the synthetic
benchmark most script tests run on, and the CLIP tests' checkpoints in every accepted form.

Session fixtures are read-only: a test that changes files copies them first (into its tmp_path)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden" / "tiny"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The release's parity fixture; tests that need it skip in a fresh clone without ../shared."""
    if not (GOLDEN_DIR / "expected.json").is_file():
        pytest.skip(f"golden parity fixture not found at {GOLDEN_DIR} (it lives in ../shared, which CI provides)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Text-feature caches of the tests go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("MVFA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mvfa-cache"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """The seeded (seed 0) tiny random ViT-Tiny-14 as a plain state dict; read it, never write it."""
    from tests.scripts_helpers import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """The synthetic benchmark (scripts_helpers.SYNTHETIC_*: 6 + 6 valid and 5 + 5 test images per dataset);
    read it, never write it (copy a dataset's folder first, as test_scripts.copy_brain does)."""
    from dataset.synthetic import generate_benchmark
    from tests.scripts_helpers import SYNTHETIC_N_TEST, SYNTHETIC_N_VALID, SYNTHETIC_SEED, SYNTHETIC_SIZE

    data = tmp_path_factory.mktemp("synthetic") / "data"
    generate_benchmark(data, seed=SYNTHETIC_SEED, image_size=SYNTHETIC_SIZE, n_valid=SYNTHETIC_N_VALID,
                       n_test=SYNTHETIC_N_TEST)
    return data


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """The CLIP tests' tiny OpenAI-layout weights in every accepted form (tests/clip_helpers.py)."""
    import clip_helpers

    return clip_helpers.tiny_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny models (see clip_helpers.one_torch_thread); restored after."""
    import clip_helpers

    yield from clip_helpers.one_torch_thread()
