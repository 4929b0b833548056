"""Peak memory inside a `with` block: resident memory (Linux's /proc/self/status) and CUDA memory."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import torch

from .common import SkipSection


def require_proc() -> None:
    """CPU peak memory is read from /proc/self/status (Linux)."""
    if not Path("/proc/self/status").is_file():
        raise SkipSection("peak RSS needs Linux's /proc/self/status")


def status_kib(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory of this process inside a `with` block, beyond what it held on entry.

    Resets the kernel's high-water mark (writing 5 to /proc/self/clear_refs) and reads VmHWM; where
    that is refused, samples VmRSS on a thread every millisecond."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = status_kib("VmRSS")
        self._sampled = 0
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, status_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, status_kib("VmRSS"))
        self.growth = max(0, self.peak - self.start) * 1024


class PeakCUDA:
    """Peak CUDA memory allocated inside a `with` block beyond what was allocated on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.growth = torch.cuda.max_memory_allocated(self.device) - self.start
