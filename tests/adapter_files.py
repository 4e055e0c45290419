"""Helpers that rewrite saved adapter directories in tests."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def without_digests(d: Path) -> Path:
    """Make ``d`` an adapter as written before digests existed (neither file vouches for the
    other), so that tests of the structural checks reach them: digests would refuse any edit
    first (tested in test_digests.py)."""
    with safe_open(str(d / "adapter.safetensors"), "pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(d / "adapter.safetensors"))
    tensors.pop("digest/manifest_sha256", None)
    save_file(tensors, str(d / "adapter.safetensors"), meta)
    manifest = json.loads((d / "slimtune.json").read_text())
    manifest.pop("weights_sha256", None)
    (d / "slimtune.json").write_text(json.dumps(manifest))
    return d
