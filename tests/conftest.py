"""Shared fixtures: the golden parity fixture from ../shared (skipped when absent)."""
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
