"""What the benchmarks share: JSON output, machine description, paired speed-ups, a small
command line.

The benchmarks live outside the installed library, in the repository's ``benchmarks/`` package:
``slimtune bench NAME [options]`` runs ``benchmarks/NAME.py``'s ``main(argv)`` (see
:mod:`slimtune.app.plugins`), and ``python -m benchmarks.NAME`` does the same from the
repository's root.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

__all__ = [
    "BenchError",
    "cores",
    "quick_out_main",
    "cpu_counters",
    "emit",
    "machine_info",
    "paired_speedup",
    "steal_fraction",
]


class BenchError(SlimtuneError, ValueError):
    """A benchmark's options are invalid (raised before any work starts)."""


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


def paired_speedup(
    base: Sequence[float], new: Sequence[float], level: float = 0.95
) -> dict[str, float | int]:
    """Speedup of ``new`` over ``base`` from interleaved step times, with its uncertainty.

    Step ``i`` of both was taken in the same round, so the per-round ratio ``base[i] / new[i]``
    cancels what drifts between rounds (another machine on the host, clock changes). Returns
    the median of those ratios (``median``) and a distribution-free confidence interval for it
    (``low``, ``high``: order statistics of the sorted ratios, the narrowest pair whose binomial
    coverage is at least ``level``; ``coverage``: the coverage it has, which is below ``level``
    when there are too few rounds, e.g. 0.9375 for 5), and ``rounds``.

    Raises:
        ValueError: no times, unequal lengths, or a time that is not positive.
    """
    if not base or len(base) != len(new):
        raise ValueError(f"need equally many step times, got {len(base)} and {len(new)}")
    if min(min(base), min(new)) <= 0:
        raise ValueError("step times must be positive")
    ratios = sorted(b / n for b, n in zip(base, new, strict=True))
    m = len(ratios)
    below = [math.comb(m, j) / 2**m for j in range(m + 1)]  # P(Binomial(m, 1/2) = j)
    k = 0  # ratios left out on each side; leaving k out covers 1 - 2 P(Binomial <= k)
    while k + 1 < m - k - 1 and 1.0 - 2 * sum(below[: k + 2]) >= level:
        k += 1
    coverage = 1.0 - 2 * sum(below[: k + 1])
    return {
        "median": round(statistics.median(ratios), 3),
        "low": round(ratios[k], 3),
        "high": round(ratios[m - 1 - k], 3),
        "coverage": round(coverage, 4),
        "rounds": m,
    }


def quick_out_main(
    prog: str, description: str, run: Callable[..., Any], argv: Sequence[str] | None
) -> int:
    """The command line of a benchmark whose only options are ``--quick`` and ``--out``."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument(
        "--quick", action="store_true", help="the small version (minutes on 2 CPU cores)"
    )
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args(None if argv is None else list(argv))
    run(quick=args.quick, out=args.out)
    return 0
