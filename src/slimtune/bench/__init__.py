"""Benchmarks."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["cores", "cpu_counters", "emit", "machine_info", "steal_fraction"]


def emit(result: dict[str, Any], path: str | Path) -> None:
    """Print a benchmark's JSON on stdout and write it to ``path`` atomically."""
    from slimtune.io import atomic_write_text

    text = json.dumps(result, indent=1)
    print(text)
    atomic_write_text(Path(path), text + "\n")
    print(f"saved {path}", file=sys.stderr)


def cpu_counters() -> tuple[float, float] | None:
    """``(steal, total)`` jiffies of all CPUs from ``/proc/stat`` (``None`` where there is none).

    Steal is time the hypervisor ran something else while this machine wanted the CPU: on a
    shared virtual machine it is what makes step times noisy.
    """
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    values = [float(v) for v in fields[1:]]
    return values[7], sum(values[:8])


def steal_fraction(before: tuple[float, float] | None) -> float | None:
    """Fraction of CPU time stolen by the hypervisor since ``before`` (:func:`cpu_counters`).

    Over the whole virtual machine, idle CPUs included: with fewer timing threads than CPUs
    it understates what the timed threads lost, so read it as "was the host busy", not as a
    correction factor.
    """
    after = cpu_counters()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers were taken."""
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cores": cores(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("transformers", "peft", "slimtune"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[pkg] = md.version(pkg)
    return info
