"""Hand freed heap memory back to the operating system.

glibc keeps freed small and mid-sized blocks in its heap for reuse. After a large one-off free (the
text tower's weights that sat between the visual weights, and the prompt encoding's buffers: about
0.18 GB on ViT-L) that memory stays resident until glibc happens to reuse it, and the evaluation's
own buffers then come on top of it. `malloc_trim(0)` returns the free pages at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def trim_heap() -> bool:
    """glibc's malloc_trim(0); False (nothing done) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
