"""Peak memory for the benchmarks: the CUDA allocator's peak, or the process's RSS high-water mark.

On CPU (Linux) the peak is ``VmHWM`` from ``/proc/self/status``, restarted by writing ``5`` to
``/proc/self/clear_refs``. Restarting it sets the mark to the *current* RSS, so memory that was
freed but is still held by the C allocator (a full-size model shrunk in place, a state dict that
was loaded and dropped) would count towards the next peak: :func:`reset_peak` collects garbage
and hands free heap pages back to the system (glibc ``malloc_trim``) first. Elsewhere (no
``/proc``) the CPU numbers are 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

import torch

__all__ = ["status_mb", "reset_peak", "peak_mb", "track_live_memory"]

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def track_live_memory(threshold: int = 128 * 1024) -> bool:
    """Make the RSS follow live memory: blocks of ``threshold`` bytes or more are mmap'd.

    glibc raises its mmap threshold each time a large mmap'd block is freed (up to 32 MiB), after
    which activation-sized blocks come from the heap and stay resident when freed, so the RSS
    peak depends on the order and sizes of past allocations (odd pruned widths fragment the heap
    differently from the dense ones). A fixed threshold returns every large block to the system
    when it is freed. Call once at the start of a measuring process. Returns ``False`` where
    there is no glibc (nothing changed).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def status_mb(key: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; 0 without ``/proc``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _on_cuda(device: torch.device | None) -> bool:
    return device.type == "cuda" if device is not None else torch.cuda.is_available()


def reset_peak(device: torch.device | None = None) -> dict[str, float]:
    """Free what can be freed, note the memory now and restart the peak from here.

    Returns:
        ``before_mb``: memory in use now (allocated CUDA memory or RSS); on CPU also
        ``previous_peak_mb``: the RSS high-water mark before the reset.
    """
    gc.collect()
    if _on_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return {"before_mb": torch.cuda.memory_allocated(device) / 2**20}
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    mark = {"previous_peak_mb": status_mb("VmHWM"), "before_mb": status_mb("VmRSS")}
    # Not Linux: no reset (and the numbers are 0 anyway).
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return mark


def peak_mb(device: torch.device | None = None) -> float:
    """The peak since the last :func:`reset_peak` in MiB (CUDA allocated, or RSS on CPU)."""
    if _on_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")
