"""Linear-feedback shift register (LFSR) pseudo-noise sequences for `paper` mode.

The register is a Fibonacci LFSR: the output bit is the lowest state bit, the feedback bit is
the XOR of the state bits selected by the polynomial's taps and enters at the top. With a
primitive polynomial of degree L every non-zero seed gives a maximal-length sequence of period
2^L - 1 (an m-sequence); all seeds give cyclic shifts of the *same* sequence, which is what the
attack in :mod:`vidcrypt.attack` exploits.

Default polynomial: x^16 + x^14 + x^13 + x^11 + 1 (taps 16, 14, 13, 11), period 65535.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .errors import ConfigError

__all__ = [
    "DEFAULT_TAPS",
    "LFSRConfig",
    "lfsr_bits",
    "lfsr_period",
    "keystream_words",
    "tiled",
    "chips",
    "berlekamp_massey",
]

DEFAULT_TAPS: tuple[int, ...] = (16, 14, 13, 11)
_MAX_DEGREE = 24


@dataclass(frozen=True)
class LFSRConfig:
    """An LFSR: polynomial taps (exponents, highest = degree) and a non-zero seed.

    Attributes:
        taps: Exponents of the feedback polynomial without the constant term, e.g.
            ``(16, 14, 13, 11)`` for x^16 + x^14 + x^13 + x^11 + 1.
        seed: Initial register state, ``1 <= seed < 2**degree``; it is the secret key.
    """

    taps: tuple[int, ...] = field(default=DEFAULT_TAPS)
    seed: int = 0xACE1

    def __post_init__(self) -> None:
        taps = tuple(int(t) for t in self.taps)
        object.__setattr__(self, "taps", taps)
        if not taps:
            raise ConfigError("LFSR taps must not be empty")
        if len(set(taps)) != len(taps) or any(t < 1 for t in taps):
            raise ConfigError(f"LFSR taps must be distinct positive exponents, got {taps}")
        if not 2 <= max(taps) <= _MAX_DEGREE:
            raise ConfigError(f"LFSR degree must be in [2, {_MAX_DEGREE}], got {max(taps)}")
        if not 1 <= self.seed < (1 << self.degree):
            raise ConfigError(
                f"LFSR seed must be in [1, 2^{self.degree} - 1], got {self.seed} "
                "(an all-zero register never leaves zero)"
            )

    @property
    def degree(self) -> int:
        """The register length L (highest tap)."""
        return max(self.taps)


@lru_cache(maxsize=16)
def _period_bits(taps: tuple[int, ...], seed: int) -> np.ndarray:
    degree = max(taps)
    positions = [degree - t for t in taps]
    mask = 0
    for pos in positions:
        mask |= 1 << pos
    state = seed
    out = bytearray()
    limit = (1 << degree) - 1
    while True:
        out.append(state & 1)
        feedback = (state & mask).bit_count() & 1
        state = (state >> 1) | (feedback << (degree - 1))
        if state == seed or len(out) >= limit:
            break
    bits = np.frombuffer(bytes(out), dtype=np.uint8).copy()
    bits.setflags(write=False)
    return bits


def lfsr_bits(config: LFSRConfig) -> np.ndarray:
    """Return one full period of output bits (uint8 0/1, read-only) starting at the seed."""
    return _period_bits(config.taps, config.seed)


def lfsr_period(config: LFSRConfig) -> int:
    """Return the period of the register's state sequence (2^L - 1 if the polynomial is primitive)."""
    return int(lfsr_bits(config).size)


@lru_cache(maxsize=16)
def _words(taps: tuple[int, ...], seed: int, width: int) -> np.ndarray:
    bits = _period_bits(taps, seed)
    period = bits.size
    n_words = period // math.gcd(period, width)
    stream = np.resize(bits, n_words * width).reshape(n_words, width).astype(np.uint16)
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.uint16)
    words = (stream * weights).sum(axis=1).astype(np.uint16)
    words.setflags(write=False)
    return words


def keystream_words(config: LFSRConfig, width: int) -> np.ndarray:
    """Return one period of ``width``-bit keystream words (MSB first, uint16, read-only).

    Consecutive non-overlapping groups of ``width`` output bits form the words; the word
    sequence repeats after ``period / gcd(period, width)`` words.

    Raises:
        ConfigError: if ``width`` is not in [1, 16].
    """
    if not 1 <= width <= 16:
        raise ConfigError(f"keystream word width must be in [1, 16] bits, got {width}")
    return _words(config.taps, config.seed, width)


def tiled(sequence: np.ndarray, start: int, count: int) -> np.ndarray:
    """Return ``count`` items of the periodic ``sequence`` starting at index ``start``."""
    idx = (start + np.arange(count, dtype=np.int64)) % sequence.size
    return sequence[idx]


def chips(config: LFSRConfig, start: int, count: int) -> np.ndarray:
    """Return ``count`` +/-1 PN chips (float64; bit 0 -> +1, bit 1 -> -1) from position ``start``."""
    bits = tiled(lfsr_bits(config), start, count)
    return 1.0 - 2.0 * bits.astype(np.float64)


def berlekamp_massey(bits: np.ndarray) -> tuple[int, list[int]]:
    """Find the shortest LFSR that generates ``bits`` over GF(2).

    Args:
        bits: Sequence of 0/1 values; 2L bits suffice to recover an LFSR of length L.

    Returns:
        ``(L, c)``: the linear complexity and connection polynomial coefficients
        ``c[0..L]`` with ``c[0] = 1`` such that ``sum_i c[i] * s[k - i] = 0`` for k >= L.
    """
    s = [int(b) & 1 for b in np.asarray(bits).ravel()]
    c = [1] + [0] * len(s)
    b = [1] + [0] * len(s)
    length, m = 0, -1
    for n in range(len(s)):
        d = s[n]
        for i in range(1, length + 1):
            d ^= c[i] & s[n - i]
        if d:
            t = c[:]
            shift = n - m
            for i in range(len(s) - shift + 1):
                c[i + shift] ^= b[i]
            if 2 * length <= n:
                length, m, b = n + 1 - length, n, t
    return length, c[: length + 1]
