"""The array transforms of `paper` mode (Chadha et al., IJCA 2015), vectorised with numpy.

Video, per frame (uint8 array in its native layout):
    layer 1: ``v = RSA(m) = m^e mod n`` for every byte (a 256-entry table gather);
    layer 2: ``c = v XOR k`` with ``bits(n-1)``-bit words of the LFSR keystream, restarted at
    the seed for every frame (as the scheme has no nonce: the keystream is reused).
Ciphertext values are ``bits(n-1)`` = 9 bits wide and are stored as uint16.

Audio (int16, interleaved): layer 1 multiplies sample ``j`` (counted from the start of the
stream) by the PN chip ``+/-1``; layer 2 is an orthonormal DCT-II over blocks of
``audio_block`` values, stored as float32. Decryption inverts both and rounds to int16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.fft import dct, idct

from .errors import ConfigError, IntegrityError
from .lfsr import DEFAULT_TAPS, LFSRConfig, chips, keystream_words, tiled
from .rsa_table import RSAParams, rsa_decrypt, rsa_encrypt

__all__ = ["PaperConfig", "PaperCipher"]


@dataclass(frozen=True)
class PaperConfig:
    """Public parameters of `paper` mode.

    Attributes:
        rsa: Per-pixel RSA primes and exponent (defaults p=17, q=19, e=5).
        taps: LFSR feedback polynomial exponents (default x^16+x^14+x^13+x^11+1).
        layers: 2 = RSA then PN XOR (the dual-layer scheme); 1 = RSA only ("single level").
        audio_block: DCT block length for audio, in interleaved samples.
    """

    rsa: RSAParams = field(default_factory=RSAParams)
    taps: tuple[int, ...] = DEFAULT_TAPS
    layers: int = 2
    audio_block: int = 1024

    def __post_init__(self) -> None:
        if self.layers not in (1, 2):
            raise ConfigError(f"layers must be 1 (RSA only) or 2 (RSA + PN), got {self.layers}")
        if not 8 <= self.audio_block <= 1 << 16:
            raise ConfigError(f"audio_block must be in [8, 65536], got {self.audio_block}")
        LFSRConfig(self.taps, 1)


class PaperCipher:
    """Encrypt and decrypt frames and audio with `paper` mode and a given PN seed.

    Args:
        config: The public parameters.
        seed: The secret LFSR seed, in [1, 2^degree - 1].
    """

    def __init__(self, config: PaperConfig, seed: int) -> None:
        self.config = config
        self.lfsr = LFSRConfig(config.taps, seed)
        self._ks_cache: dict[int, np.ndarray] = {}

    def keystream(self, size: int) -> np.ndarray:
        """The first ``size`` keystream words (uint16), identical for every frame."""
        ks = self._ks_cache.get(size)
        if ks is None:
            words = keystream_words(self.lfsr, self.config.rsa.bits)
            ks = tiled(words, 0, size)
            self._ks_cache = {size: ks}
        return ks

    def encrypt_frame(self, frame: np.ndarray) -> np.ndarray:
        """Encrypt a uint8 frame; returns uint16 ciphertext values of the same shape."""
        out = rsa_encrypt(frame, self.config.rsa)
        if self.config.layers == 2:
            out = out ^ self.keystream(out.size).reshape(out.shape)
        return out

    def decrypt_frame(self, values: np.ndarray) -> np.ndarray:
        """Decrypt uint16 ciphertext values back to the uint8 frame.

        Raises:
            IntegrityError: if a value decrypts to no valid pixel (corrupt data).
        """
        if self.config.layers == 2:
            values = values ^ self.keystream(values.size).reshape(values.shape)
        return rsa_decrypt(values, self.config.rsa)

    def _dct_blocks(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        fn = idct if inverse else dct
        b = self.config.audio_block
        full = (x.size // b) * b
        out = np.empty_like(x)
        if full:
            out[:full] = fn(x[:full].reshape(-1, b), type=2, norm="ortho", axis=1).ravel()
        if full < x.size:
            out[full:] = fn(x[full:], type=2, norm="ortho")
        return out

    def encrypt_audio(self, samples: np.ndarray, start: int) -> np.ndarray:
        """Encrypt int16 audio whose first interleaved value has stream index ``start``.

        Returns:
            float32 DCT coefficients, flattened (same count as ``samples``).
        """
        x = samples.ravel().astype(np.float64) * chips(self.lfsr, start, samples.size)
        if self.config.layers == 2:
            x = self._dct_blocks(x, inverse=False)
        return x.astype(np.float32)

    def decrypt_audio(self, coeffs: np.ndarray, start: int) -> np.ndarray:
        """Invert :meth:`encrypt_audio`; returns flat int16 samples."""
        x = coeffs.astype(np.float64)
        if not np.isfinite(x).all():
            raise IntegrityError("audio record holds non-finite values")
        if self.config.layers == 2:
            x = self._dct_blocks(x, inverse=True)
        x = np.rint(x * chips(self.lfsr, start, x.size))
        return np.clip(x, -32768, 32767).astype(np.int16)
