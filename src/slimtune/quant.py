"""Low-precision weights: standardise, quantize to levels optimal for N(0, 1), pack bits.

Quantization-aware training as in Jie et al. (ICCV 2023)::

    w_hat = (w - mu) / (sigma + 1e-5)          per matrix, mu/sigma NOT detached
    w_q   = (Q(w_hat) - w_hat).detach() + w_hat  straight-through estimator
    w_out = w_q * sigma + mu

``Q`` maps to the nearest of ``2**bits`` levels. The levels are computed, not tabulated, by
Lloyd iterations on the standard normal: boundaries are midpoints between levels, and each
level is the *median* of its bin (``l1``, the paper's choice: 1 bit gives +/-0.6745) or the
*mean* of its bin (``mse``, Lloyd-Max: 1 bit gives +/-0.7979).

Storage packs the level indices ("codes") ``8 // bits`` to a byte, little-end first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from .errors import PlanError

__all__ = [
    "QuantSpec",
    "BITS",
    "normal_levels",
    "quantize",
    "encode",
    "decode",
    "pack_codes",
    "unpack_codes",
    "EPS",
]

BITS = (1, 2, 4, 8, 32)
CRITERIA = ("l1", "mse")
EPS = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    """Precision of a weight matrix.

    Attributes:
        bits: 1, 2, 4, 8, or 32 (no quantization).
        criterion: ``l1`` (bin medians) or ``mse`` (bin means, Lloyd-Max).
    """

    bits: int = 32
    criterion: str = "l1"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise PlanError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.criterion not in CRITERIA:
            raise PlanError(
                f"quantization criterion must be one of {CRITERIA}, got {self.criterion!r}"
            )


@functools.cache
def _levels_np(bits: int, criterion: str, iters: int = 500) -> tuple[np.ndarray, np.ndarray]:
    k = 2**bits
    levels = norm.ppf((np.arange(k) + 0.5) / k)
    for _ in range(iters):
        bounds = (levels[1:] + levels[:-1]) / 2
        lo = np.concatenate([[-np.inf], bounds])
        hi = np.concatenate([bounds, [np.inf]])
        cdf_lo, cdf_hi = norm.cdf(lo), norm.cdf(hi)
        if criterion == "l1":
            new = norm.ppf((cdf_lo + cdf_hi) / 2)
        else:
            new = (norm.pdf(lo) - norm.pdf(hi)) / (cdf_hi - cdf_lo)
        if np.max(np.abs(new - levels)) < 1e-10:
            levels = new
            break
        levels = new
    return levels, (levels[1:] + levels[:-1]) / 2


def normal_levels(bits: int, criterion: str = "l1") -> tuple[Tensor, Tensor]:
    """Levels (``2**bits``, ascending) and the boundaries between them, for N(0, 1)."""
    QuantSpec(bits, criterion)
    if bits >= 32:
        raise PlanError("32-bit weights are not quantized: there are no levels")
    levels, bounds = _levels_np(bits, criterion)
    return torch.tensor(levels, dtype=torch.float64), torch.tensor(bounds, dtype=torch.float64)


def _stats(w: Tensor) -> tuple[Tensor, Tensor]:
    return w.mean(), w.std(unbiased=False)


def encode(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (int64, same shape as ``w``), mu and sigma of a matrix (no gradient)."""
    with torch.no_grad():
        mu, sigma = _stats(w.float())
        levels, bounds = normal_levels(spec.bits, spec.criterion)
        w_hat = (w.float() - mu) / (sigma + EPS)
        codes = torch.bucketize(w_hat, bounds.to(w_hat.device, torch.float32))
    return codes, mu, sigma


def decode(codes: Tensor, mu: Tensor, sigma: Tensor, spec: QuantSpec) -> Tensor:
    """The de-quantized matrix ``level[codes] * sigma + mu`` (float32)."""
    levels, _ = normal_levels(spec.bits, spec.criterion)
    q = levels.to(codes.device, torch.float32)[codes.long()]
    return (q + 0.0) * sigma.float() + mu.float()


def quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize ``w`` with a straight-through estimator (forward: levels; backward: identity).

    Gradients flow to ``w`` through ``w_hat`` and through mu and sigma.
    """
    if spec.bits >= 32:
        return w
    levels, bounds = normal_levels(spec.bits, spec.criterion)
    mu, sigma = _stats(w)
    w_hat = (w - mu) / (sigma + EPS)
    with torch.no_grad():
        idx = torch.bucketize(w_hat, bounds.to(w.device, w_hat.dtype))
        q = levels.to(w.device, w_hat.dtype)[idx]
    # Forward value is exactly ``q * sigma + mu`` (what :func:`decode` gives back after a save);
    # ``w_hat - w_hat.detach()`` is an exact zero that carries the straight-through gradient.
    return (q + (w_hat - w_hat.detach())) * sigma + mu


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor, ``8 // bits`` per byte."""
    if bits not in (1, 2, 4, 8):
        raise PlanError(f"can only pack 1, 2, 4 or 8-bit codes, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise PlanError(f"code {int(flat.max())} does not fit in {bits} bits")
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (groups << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int64."""
    if bits not in (1, 2, 4, 8):
        raise PlanError(f"can only unpack 1, 2, 4 or 8-bit codes, got {bits}")
    per = 8 // bits
    need = -(-numel // per)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise PlanError(
            f"packed codes hold {packed.numel()} bytes ({packed.dtype}); {numel} codes of {bits} "
            f"bits need exactly {need} uint8 bytes"
        )
    shifts = torch.arange(per, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel].long()
