"""Timing and peak-memory helpers for the benchmark scripts (no work at import time).

CPU peak memory is measured from the process's resident set, because torch's CPU allocator
keeps no statistics: glibc is told to serve every block of 64 KiB or more with its own
``mmap`` (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc's adaptive threshold from
parking freed blocks in the heap), so resident memory follows the live tensors; the
kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before
the measured step.  Where that is not possible (not Linux/glibc) the fallback is
``getrusage`` ``ru_maxrss``, which cannot be reset, taken on the first step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024
MIB = 1024 * 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc only; musl and macOS lack it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class CpuPeakMemory:
    """Peak resident memory of one call, in bytes above the resident memory before it.

    Call :meth:`prepare` once (after the timed steps, which must run with the default
    allocator settings), then :meth:`measure` with the step.
    """

    def __init__(self) -> None:
        self.libc = _libc()
        self.method = "ru_maxrss"

    def prepare(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_BYTES)
        self._release()
        if _proc_status_kib("VmHWM") is not None and _can_reset_hwm():
            self.method = "VmHWM"

    def _release(self) -> None:
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure(self, step: Callable[[], object]) -> int:
        self._release()
        if self.method == "VmHWM":
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            before = _proc_status_kib("VmRSS") or 0
            step()
            peak = _proc_status_kib("VmHWM") or 0
            return max(0, peak - before) * 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - before) * (1 if platform.system() == "Darwin" else 1024)

    def describe(self) -> str:
        if self.method == "VmHWM":
            return (
                "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before the step, "
                f"glibc mmap threshold fixed at {_MMAP_THRESHOLD_BYTES // 1024} KiB"
            )
        return "ru_maxrss growth during the step (not resettable; a lower bound)"


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def cuda_peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` during ``step`` minus the allocation before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


@contextmanager
def _gc_paused() -> Iterator[None]:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_step_s(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call (synchronised on CUDA), garbage collector paused.

    The CPU time (all threads, spin-waiting included) is a cross-check on a shared machine:
    with one torch thread it barely moves when other processes compete for the cores.
    """
    with _gc_paused():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu_start, start = time.process_time(), time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
