"""Run a benchmark module in a fresh Python process and read the JSON line it prints last.

A fresh process is how the benchmarks measure peak memory: nothing from earlier runs stays
resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_child"]


def run_child(module: str, args: list[str], what: str) -> dict[str, Any]:
    """``python -m module *args``; its last stdout line parsed as JSON.

    Raises:
        RuntimeError: the process failed (the message ends with its stderr), naming ``what``.
    """
    cmd = [sys.executable, "-m", module, *args]
    root = str(Path(__file__).resolve().parents[1])  # the repository: benchmarks/ is not installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{what} subprocess failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
