"""Benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["emit"]


def emit(result: dict[str, Any], path: str | Path) -> None:
    """Print a benchmark's JSON on stdout and write it to ``path`` atomically."""
    from slimtune.io import atomic_write_text

    text = json.dumps(result, indent=1)
    print(text)
    atomic_write_text(Path(path), text + "\n")
    print(f"saved {path}", file=sys.stderr)
