"""`paper` mode files: stream an AVI through :class:`~vidcrypt.paper_cipher.PaperCipher`.

Body records (big-endian): ``kind (u8) | length (u32) | payload`` with kind 1 = video frame
(uint16 little-endian ciphertext values, shape ``frame_shape`` from the header), kind 2 = audio
(float32 little-endian DCT coefficients, interleaved) and kind 0 = end (payload: frame count
u32, audio value count u64). The header holds the public parameters (``n``, ``e``, taps,
layers) in clear; the secret PN seed and the primes travel RSA-OAEP-wrapped for the recipient's
key (the paper does not say how the seed is shared). Nothing authenticates the body: the end
record only catches accidental truncation.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.hazmat.primitives.asymmetric import rsa

from .container import MODE_PAPER, Preamble, atomic_output, read_exact, write_preamble
from .errors import ConfigError, IntegrityError
from .keys import fingerprint, unwrap_key, wrap_key
from .media import AviWriter, MediaInfo, iter_streams, probe
from .paper_cipher import PaperCipher, PaperConfig
from .rsa_table import RSAParams

__all__ = ["encrypt_file", "decrypt_file", "read_records", "info_from_header"]

KIND_END, KIND_VIDEO, KIND_AUDIO = 0, 1, 2
_REC = struct.Struct(">BI")
_END = struct.Struct(">IQ")


def _write(fh: BinaryIO, kind: int, payload: bytes) -> None:
    fh.write(_REC.pack(kind, len(payload)))
    fh.write(payload)


def encrypt_file(
    src: str | Path,
    dst: str | Path,
    public: rsa.RSAPublicKey,
    config: PaperConfig | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Encrypt an AVI with `paper` mode into a vidcrypt container.

    Args:
        src: Input AVI.
        dst: Output file.
        public: Recipient key that wraps the seed and primes (RSA-OAEP).
        config: Public parameters; defaults documented in :class:`PaperConfig`.
        seed: Secret LFSR seed; random when omitted.

    Returns:
        Statistics: frames, byte counts, and seconds split into decode/transform/write.
    """
    cfg = config or PaperConfig()
    info = probe(src)
    degree = max(cfg.taps)
    seed = seed if seed is not None else 1 + secrets.randbelow((1 << degree) - 1)
    cipher = PaperCipher(cfg, seed)
    secret = json.dumps({"seed": seed, "p": cfg.rsa.p, "q": cfg.rsa.q}).encode()
    shape = _frame_shape(info)
    header = {
        "scheme": "paper (RSA per pixel + LFSR PN XOR; audio PN chips + block DCT)",
        "n": cfg.rsa.n,
        "e": cfg.rsa.e,
        "bits": cfg.rsa.bits,
        "taps": list(cfg.taps),
        "layers": cfg.layers,
        "audio_block": cfg.audio_block,
        "width": info.width,
        "height": info.height,
        "pix_fmt": info.pix_fmt,
        "frame_shape": list(shape),
        "fps": str(info.fps),
        "audio_rate": info.audio_rate,
        "channels": info.channels,
        "key_fingerprint": fingerprint(public),
        "wrapped_secret": base64.b64encode(wrap_key(public, secret)).decode(),
    }
    t = {"decode": 0.0, "transform": 0.0, "write": 0.0}
    frames = values = plain = 0
    with atomic_output(dst) as tmp, open(tmp, "wb") as fout:
        write_preamble(fout, MODE_PAPER, header)
        items = iter_streams(src, info)
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            t1 = time.perf_counter()
            t["decode"] += t1 - t0
            if item is None:
                break
            kind, arr = item
            plain += arr.nbytes
            if kind == "video":
                payload = cipher.encrypt_frame(arr).astype("<u2").tobytes()
                rec, frames = KIND_VIDEO, frames + 1
            else:
                payload = cipher.encrypt_audio(arr, values).astype("<f4").tobytes()
                rec, values = KIND_AUDIO, values + arr.size
            t2 = time.perf_counter()
            _write(fout, rec, payload)
            t["transform"] += t2 - t1
            t["write"] += time.perf_counter() - t2
        _write(fout, KIND_END, _END.pack(frames, values))
        n_out = fout.tell()
    return {
        "frames": frames,
        "plaintext_bytes": plain,
        "bytes_in": Path(src).stat().st_size,
        "bytes_out": n_out,
        "seconds": sum(t.values()),
        **{f"{k}_seconds": v for k, v in t.items()},
    }


def _frame_shape(info: MediaInfo) -> tuple[int, ...]:
    w, h = info.width, info.height
    return {
        "gray": (h, w),
        "yuv420p": (h * 3 // 2, w),
        "yuv444p": (3, h, w),
    }.get(info.pix_fmt, (h, w, 3))


def info_from_header(h: dict[str, Any]) -> MediaInfo:
    """Rebuild the stream description stored in a paper header (sizes and rates checked)."""
    fps = Fraction(h["fps"])
    if fps <= 0 or int(h["width"]) < 1 or int(h["height"]) < 1:
        raise ConfigError(
            f"frame rate and size must be positive, got fps {h['fps']!r}, "
            f"{h['width']}x{h['height']}"
        )
    if int(h["audio_rate"]) < 0 or int(h["channels"]) < 0:
        raise ConfigError(
            f"audio rate and channels must be >= 0, got {h['audio_rate']}, {h['channels']}"
        )
    return MediaInfo(
        int(h["width"]),
        int(h["height"]),
        str(h["pix_fmt"]),
        Fraction(h["fps"]),
        int(h["audio_rate"]),
        int(h["channels"]),
    )


def read_records(fh: BinaryIO, header: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``("video", uint16 values)`` and ``("audio", float32 coeffs)`` until the end record.

    ``fh`` must be positioned at the body. Raises :class:`IntegrityError` on malformed records
    or a missing end record.
    """
    shape = tuple(int(s) for s in header["frame_shape"])
    frame_bytes = 2 * int(np.prod(shape))
    limit = max(frame_bytes, 1 << 26)
    while True:
        rec = fh.read(_REC.size)
        if len(rec) < _REC.size:
            raise IntegrityError("paper file is truncated (no end record)")
        kind, length = _REC.unpack(rec)
        if kind == KIND_END:
            read_exact(fh, length, "end record")
            return
        if kind == KIND_VIDEO and length == frame_bytes:
            data = read_exact(fh, length, "video frame")
            yield "video", np.frombuffer(data, dtype="<u2").reshape(shape).astype(np.uint16)
        elif kind == KIND_AUDIO and length % 4 == 0 and length <= limit:
            data = read_exact(fh, length, "audio record")
            yield "audio", np.frombuffer(data, dtype="<f4")
        else:
            raise IntegrityError(f"malformed paper record (kind {kind}, length {length})")


def decrypt_file(
    src: str | Path, dst: str | Path, private: rsa.RSAPrivateKey, pre: Preamble
) -> dict[str, Any]:
    """Decrypt a `paper` container into an AVI (FFV1 or rawvideo + PCM s16)."""
    h = pre.header
    try:
        secret = unwrap_key(private, base64.b64decode(h["wrapped_secret"]), h["key_fingerprint"])
        sec = json.loads(secret)
        params = RSAParams(int(sec["p"]), int(sec["q"]), int(h["e"]))
        if params.n != int(h["n"]):
            raise IntegrityError(f"header modulus {h['n']} does not match the key's {params.n}")
        cfg = PaperConfig(params, tuple(h["taps"]), int(h["layers"]), int(h["audio_block"]))
        cipher = PaperCipher(cfg, int(sec["seed"]))
        info = info_from_header(h)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise IntegrityError(f"paper header is invalid: {exc}") from exc
    t0 = time.perf_counter()
    frames = values = 0
    with atomic_output(dst) as tmp, open(src, "rb") as fin:
        fin.seek(pre.body_offset)
        with AviWriter(tmp, info) as out:
            for kind, arr in read_records(fin, h):
                if kind == "video":
                    out.write_video(cipher.decrypt_frame(arr))
                    frames += 1
                else:
                    pcm = cipher.decrypt_audio(arr, values)
                    values += arr.size
                    out.write_audio(pcm.reshape(-1, max(info.channels, 1)))
    return {"frames": frames, "seconds": time.perf_counter() - t0}
