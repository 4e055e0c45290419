"""Adapters of format versions 1 and 2, which still load.

Version 2 lists one manifest entry per tensor (a mapping from tensor name to description, with
the byte range ``"codes": [offset, nbytes]`` and ``"scale": row`` of a quantized matrix, float
tensors stored by name). Version 1 stores three tensors per quantized matrix: ``<name>.codes``
(bit-packed), ``<name>.mu`` and ``<name>.sigma``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import LoadError, PlanError
from ..quant import QuantSpec, unpack_codes

__all__ = ["V1_SUFFIXES", "describe_v2", "v1_codes", "v1_nbytes"]

V1_SUFFIXES = (".codes", ".mu", ".sigma")
"""The three tensors of a quantized matrix in format 1."""


def describe_v2(raw: Any, mpath: Path) -> dict[str, dict[str, Any]]:
    """The per-tensor descriptions of a format 1 or 2 manifest (stored as they are)."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise LoadError(f"{mpath}: 'tensors' must map tensor names to descriptions")
    return raw


def v1_codes(
    name: str, spec: QuantSpec, numel: int, tensors: dict[str, Tensor], path: Path, weights: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The unpacked codes, mu and sigma of quantized matrix ``name`` stored in format 1."""
    for suffix in V1_SUFFIXES:
        if name + suffix not in tensors:
            raise LoadError(f"{path / weights}: missing tensor {name + suffix!r}")
    try:
        codes = unpack_codes(tensors[name + ".codes"], spec.bits, numel)
    except PlanError as exc:
        raise LoadError(
            f"{path / weights}: tensor {name + '.codes'!r}: {exc} (bits={spec.bits} in the manifest)"
        ) from exc
    return codes, tensors[name + ".mu"][0], tensors[name + ".sigma"][0]


def v1_nbytes(name: str, tensors: dict[str, Tensor]) -> int:
    """Bytes of tensor data of a format-1 quantized matrix (codes, mu, sigma)."""
    return sum(tensors[name + s].numel() * tensors[name + s].element_size() for s in V1_SUFFIXES)
