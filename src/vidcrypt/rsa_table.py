"""Per-pixel textbook RSA of `paper` mode, as 256-entry lookup tables.

Every pixel value m in [0, 255] is encrypted as ``c = m^e mod n`` with a tiny modulus
``n = p * q > 255``. Because there are only 256 plaintexts, the whole cipher is a fixed
substitution table; :func:`rsa_encrypt` and :func:`rsa_decrypt` are numpy gathers. The same
observation is the attack: the table can be built from the public ``(n, e)`` alone.

Defaults: p = 17, q = 19, n = 323, e = 5, d = 173 (e * d = 865 = 3 * 288 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import ConfigError, IntegrityError

__all__ = ["RSAParams", "rsa_encrypt", "rsa_decrypt", "fixed_points", "public_table_inverse"]

INVALID = np.uint16(0xFFFF)


def _is_prime(k: int) -> bool:
    if k < 2:
        return False
    return all(k % i for i in range(2, math.isqrt(k) + 1))


@dataclass(frozen=True)
class RSAParams:
    """Textbook RSA parameters for per-pixel encryption.

    Attributes:
        p: First prime.
        q: Second prime, distinct from ``p``; ``p * q`` must exceed 255 and be below 65536.
        e: Public exponent, coprime with ``(p - 1) * (q - 1)``.
    """

    p: int = 17
    q: int = 19
    e: int = 5

    def __post_init__(self) -> None:
        for name, val in (("p", self.p), ("q", self.q)):
            if not _is_prime(val):
                raise ConfigError(f"RSA {name} must be prime, got {val}")
        if self.p == self.q:
            raise ConfigError(f"RSA p and q must differ, both are {self.p}")
        if not 255 < self.n < 65536:
            raise ConfigError(f"RSA modulus n = p*q must be in (255, 65536), got {self.n}")
        if not 1 < self.e < self.phi or math.gcd(self.e, self.phi) != 1:
            raise ConfigError(
                f"RSA e must be in (1, {self.phi}) and coprime with phi(n) = {self.phi}, got {self.e}"
            )

    @property
    def n(self) -> int:
        """The modulus p * q."""
        return self.p * self.q

    @property
    def phi(self) -> int:
        """Euler's totient (p - 1)(q - 1)."""
        return (self.p - 1) * (self.q - 1)

    @property
    def d(self) -> int:
        """The private exponent e^-1 mod phi(n)."""
        return pow(self.e, -1, self.phi)

    @property
    def bits(self) -> int:
        """Bits needed to store a ciphertext value (9 for n = 323)."""
        return (self.n - 1).bit_length()

    @cached_property
    def enc_table(self) -> np.ndarray:
        """uint16 array of 256 ciphertexts, ``enc_table[m] = m^e mod n``."""
        return _table(self.n, self.e)

    @cached_property
    def dec_table(self) -> np.ndarray:
        """uint16 array of size 2^bits mapping ciphertexts back to pixels (0xFFFF = invalid)."""
        return _inverse(self.enc_table, 1 << self.bits)


def _table(n: int, e: int) -> np.ndarray:
    table = np.array([pow(m, e, n) for m in range(256)], dtype=np.uint16)
    table.setflags(write=False)
    return table


def _inverse(enc: np.ndarray, size: int) -> np.ndarray:
    inv = np.full(size, INVALID, dtype=np.uint16)
    inv[enc] = np.arange(256, dtype=np.uint16)
    inv.setflags(write=False)
    return inv


def rsa_encrypt(pixels: np.ndarray, params: RSAParams) -> np.ndarray:
    """Encrypt uint8 pixel values element-wise; returns uint16 values in [0, n)."""
    if pixels.dtype != np.uint8:
        raise ConfigError(f"paper-mode RSA expects uint8 pixels, got dtype {pixels.dtype}")
    return params.enc_table[pixels]


def rsa_decrypt(values: np.ndarray, params: RSAParams) -> np.ndarray:
    """Decrypt uint16 ciphertext values element-wise to uint8 pixels.

    Raises:
        IntegrityError: if a value is not the encryption of any byte (corrupt input).
    """
    mask = (1 << params.bits) - 1
    out = params.dec_table[values & mask]
    if (values > mask).any() or (out == INVALID).any():
        bad = int(np.count_nonzero((out == INVALID) | (values > mask)))
        raise IntegrityError(f"{bad} ciphertext values are not valid RSA images mod n={params.n}")
    return out.astype(np.uint8)


def fixed_points(params: RSAParams) -> list[int]:
    """Pixel values m with m^e mod n == m (always includes 0 and 1; n-1 when n-1 <= 255)."""
    return [m for m in range(256) if int(params.enc_table[m]) == m]


def public_table_inverse(n: int, e: int) -> np.ndarray:
    """Attack helper: invert per-pixel RSA from the public ``(n, e)`` only, no ``d`` needed.

    Returns:
        uint16 array of size 2^bits(n-1) mapping each ciphertext to its pixel (0xFFFF if none).
    """
    bits = (n - 1).bit_length()
    return _inverse(_table(n, e), 1 << bits)
