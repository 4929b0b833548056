"""mvfa.runtime.heap.trim_heap: glibc's malloc_trim where it exists, nothing elsewhere."""
from __future__ import annotations

import platform

import pytest

from mvfa.runtime import heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_trim_heap_calls_malloc_trim_on_glibc():
    assert heap.trim_heap() is True


def test_trim_heap_is_a_no_op_without_a_c_library(monkeypatch):
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap.trim_heap() is False


def test_trim_heap_is_a_no_op_without_malloc_trim(monkeypatch):
    class NoTrim:
        def __init__(self, name):
            pass

    monkeypatch.setattr(heap.ctypes, "CDLL", NoTrim)
    assert heap.trim_heap() is False


def test_trim_heap_is_a_no_op_when_the_library_does_not_load(monkeypatch):
    def refuse(name):
        raise OSError("no such library")

    monkeypatch.setattr(heap.ctypes, "CDLL", refuse)
    assert heap.trim_heap() is False
