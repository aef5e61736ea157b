"""Peak memory of a region of code, measured (never computed from tensor shapes).

    with PeakMemory(device) as peak:
        model(tokens)
    peak.extra      # bytes the region added at its peak, over what was held when it started
    peak.method     # how it was measured

* **CUDA** (``cuda_allocator``): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
  ``peak.peak`` is the allocator's peak (everything allocated, weights included), ``peak.baseline`` what
  was allocated at the start.
* **CPU on Linux** (``rss_hwm``): the process' resident set. Writing ``5`` to ``/proc/self/clear_refs``
  resets the kernel's high-water mark ``VmHWM`` to the current RSS, so ``VmHWM`` read at the end is the
  peak RSS *within* the region; ``peak.baseline`` is the RSS at the start (Python, libraries, weights...).
  Before the reset, ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed heap memory back to the
  system, so memory freed by earlier work is not silently reused by the region (which would hide it).
* **CPU elsewhere, or where clear_refs is refused** (``rss_sampled``): a thread samples the RSS every
  millisecond with ``psutil`` (a peak shorter than that can be missed).

RSS counts pages really touched: a tensor allocated but never written may not show. Other threads of the
process count too: measure in a quiet process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int:
    """A ``VmXXX:  1234 kB`` field of /proc/self/status, in kB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in {STATUS}")


def _release_free_heap() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.001):
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(), interval
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


class PeakMemory:
    """Context manager measuring the peak memory of its body on ``device`` (see the module docstring).

    ``devices``: the CUDA devices of a model spread over several GPUs (``device_map``); the allocator
    peaks (and baselines) are summed over them."""

    def __init__(self, device="cpu", devices=None):
        self.device = torch.device(device)
        self.devices = [torch.device(d) for d in devices] if devices else [self.device]
        self.method: str | None = None
        self.baseline = self.peak = None  # bytes
        self._sampler: _RssSampler | None = None

    @property
    def extra(self) -> int:
        """Bytes the body added at its peak over the start (>= 0)."""
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            for d in self.devices:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
            self.method, self.baseline = "cuda_allocator", sum(torch.cuda.memory_allocated(d) for d in self.devices)
            return self
        _release_free_heap()
        if _reset_hwm():
            self.method, self.baseline = "rss_hwm", _status_kb("VmRSS") * 1024
        else:
            self._sampler = _RssSampler()
            self.method, self.baseline = "rss_sampled", self._sampler.peak
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.method == "cuda_allocator":
            for d in self.devices:
                torch.cuda.synchronize(d)
            self.peak = sum(torch.cuda.max_memory_allocated(d) for d in self.devices)
        elif self.method == "rss_hwm":
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self.peak = self._sampler.stop()
        return False
