"""Ciphertext-only attack on `paper` mode using only public information.

1. RSA layer: per-pixel RSA has 256 plaintexts, so the public ``(n, e)`` in the file header
   is enough to tabulate ``m -> m^e mod n`` and invert it; ``d`` and the primes are not used.
2. PN layer (two-layer files): every seed of a maximal-length LFSR yields a cyclic shift of
   one m-sequence, so the unknown seed is just an offset in [0, 2^L - 1). For each offset the
   attacker XORs the first ciphertext values with the implied keystream and keeps offsets
   where *every* result is a valid RSA image (256 of the 2^9 values are): a wrong offset
   survives 64 checks with probability about 2^-64. The seed follows from the offset.
3. Audio: the same seed gives the PN chips; the DCT has no key.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .container import atomic_output, read_preamble
from .errors import ConfigError, UnsupportedFileError
from .keys import fingerprint, load_public_key
from .lfsr import LFSRConfig, keystream_words, lfsr_bits, lfsr_period, tiled
from .media import AviWriter
from .paper import info_from_header, read_records
from .paper_cipher import PaperCipher, PaperConfig
from .rsa_table import INVALID, public_table_inverse

__all__ = ["recover_seed", "attack_file"]


def recover_seed(
    values: np.ndarray, n: int, e: int, taps: tuple[int, ...], probe: int = 64
) -> tuple[int, int]:
    """Recover the LFSR seed from one two-layer ciphertext frame and the public ``(n, e)``.

    Args:
        values: The frame's ciphertext values (any shape; the first ``probe`` are used).
        n: Public RSA modulus.
        e: Public RSA exponent.
        taps: The (public) LFSR polynomial; it must be maximal-length.
        probe: How many ciphertext values to test each offset on.

    Returns:
        ``(seed, candidates)``: the recovered seed and how many offsets passed all checks.
    """
    base = LFSRConfig(tuple(taps), 1)
    degree, period = base.degree, lfsr_period(base)
    if period != (1 << degree) - 1:
        raise ConfigError(
            f"polynomial {taps} has period {period}, not 2^{degree}-1; this attack needs an m-sequence"
        )
    inv = public_table_inverse(n, e)
    width = (n - 1).bit_length()
    c = values.ravel()[:probe].astype(np.uint16)
    k = c.size
    bits = lfsr_bits(base)
    doubled = np.concatenate([bits, bits[: width * k + degree]])
    windows = sliding_window_view(doubled, width * k)[:period]
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.uint16)
    alive = np.arange(period)
    for j in range(k):
        seg = windows[alive, j * width : (j + 1) * width].astype(np.uint16)
        word = seg @ weights
        alive = alive[inv[c[j] ^ word] != INVALID]
        if alive.size <= 1:
            break
    if alive.size == 0:
        raise ConfigError("no LFSR offset explains the ciphertext (not a two-layer paper file?)")
    offset = int(alive[0])
    seed = sum(int(bits[(offset + i) % period]) << i for i in range(degree))
    return seed, int(alive.size)


def attack_file(
    src: str | Path, dst: str | Path, public_key: str | Path | None = None
) -> dict[str, Any]:
    """Recover a `paper` file's video (and audio) without the private key; write an AVI.

    Args:
        src: A paper-mode vidcrypt file.
        dst: Output AVI with the recovered streams.
        public_key: Optional recipient public key, only checked against the header.

    Returns:
        Statistics: layers, recovered seed, invalid values, frames, seconds.
    """
    t0 = time.perf_counter()
    with open(src, "rb") as fh:
        pre = read_preamble(fh, src)
        if pre.mode != "paper":
            raise UnsupportedFileError(
                f"{src} is a {pre.mode}-mode file; the attack targets paper mode"
            )
        h = pre.header
        key_matches = None
        if public_key is not None:
            key_matches = fingerprint(load_public_key(public_key)) == h["key_fingerprint"]
        n, e, layers, taps = int(h["n"]), int(h["e"]), int(h["layers"]), tuple(h["taps"])
        block = int(h["audio_block"])
        inv = public_table_inverse(n, e)
        info = info_from_header(h)
        seed: int | None = None
        candidates = 0
        frames = invalid = values_seen = 0
        ks: np.ndarray | None = None
        pending: list[np.ndarray] = []
        audio: PaperCipher | None = None
        with atomic_output(dst) as tmp, AviWriter(tmp, info) as out:
            for kind, arr in read_records(fh, h):
                if kind == "video":
                    if layers == 2:
                        if seed is None:
                            seed, candidates = recover_seed(arr, n, e, taps)
                            words = keystream_words(LFSRConfig(taps, seed), (n - 1).bit_length())
                            ks = tiled(words, 0, arr.size).reshape(arr.shape)
                            audio = PaperCipher(
                                PaperConfig(taps=taps, layers=2, audio_block=block), seed
                            )
                        assert ks is not None
                        arr = arr ^ ks
                    pix = inv[arr]
                    invalid += int(np.count_nonzero(pix == INVALID))
                    out.write_video(np.where(pix == INVALID, 0, pix).astype(np.uint8))
                    frames += 1
                else:
                    pending.append(arr)
                if layers == 1 or audio is not None:
                    for coeffs in pending:
                        pcm = _recover_audio(audio, coeffs, values_seen)
                        values_seen += coeffs.size
                        out.write_audio(pcm.reshape(-1, max(info.channels, 1)))
                    pending.clear()
    return {
        "layers": layers,
        "n": n,
        "e": e,
        "recovered_seed": seed,
        "seed_candidates": candidates,
        "frames": frames,
        "invalid_values": invalid,
        "key_matches_header": key_matches,
        "seconds": time.perf_counter() - t0,
    }


def _recover_audio(cipher: PaperCipher | None, coeffs: np.ndarray, start: int) -> np.ndarray:
    """Decrypt audio with the recovered seed; single-layer audio (PN chips only) is kept as is."""
    if cipher is not None:
        return cipher.decrypt_audio(coeffs, start)
    return np.clip(np.rint(coeffs.astype(np.float64)), -32768, 32767).astype(np.int16)
