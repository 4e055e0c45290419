"""Digests that tie an adapter's two files together, so that a flipped bit anywhere, or a save
interrupted between its two files, is refused on load instead of loading silently.

::

    slimtune.json        ... "weights_sha256": sha256 of adapter.safetensors (the whole file)
    adapter.safetensors  tensor "digest/manifest_sha256" (32 bytes): sha256 of the manifest's
                         canonical JSON (sorted keys, no spaces) without "weights_sha256"

Each file vouches for the other without a cycle. A change in the weights (data or header)
breaks ``weights_sha256``; a change in the manifest breaks ``manifest_sha256`` (or, in the
``weights_sha256`` entry itself, that digest). ``save`` writes the weights first and the
manifest last, so an interruption leaves a new weights file beside the old manifest, which
does not match: refused, never mixed. Adapters written before digests existed have neither
entry and load as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DIGEST_TENSOR",
    "WEIGHTS_KEY",
    "canonical_digest",
    "digest_tensor",
    "digest_text",
    "file_digest",
]

WEIGHTS_KEY = "weights_sha256"
DIGEST_TENSOR = "digest/manifest_sha256"
"""A tensor, not a metadata entry: safetensors writes metadata keys in no fixed order, and a
saved adapter is byte-for-byte reproducible."""


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest as canonical JSON, leaving out its ``weights_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != WEIGHTS_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def digest_tensor(hexdigest: str) -> torch.Tensor:
    """A sha256 (hex) as a 32-byte ``uint8`` tensor."""
    return torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8)


def digest_text(t: torch.Tensor) -> str:
    """The hex sha256 held by :func:`digest_tensor`'s tensor ("" if it is not 32 bytes)."""
    if t.dtype != torch.uint8 or t.numel() != 32:
        return ""
    return bytes(t.tolist()).hex()
