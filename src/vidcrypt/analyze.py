"""`vidcrypt analyze`: compare an original AVI with its encrypted vidcrypt file.

What an "encrypted frame" is:
    * paper mode: the stored ciphertext values of a frame (9-bit symbols, 512 levels);
    * secure mode: the file has no frames, so the AES-GCM ciphertext bytes (tags removed) are
      cut into consecutive pieces of one original frame's byte size and laid out in its shape
      (256 levels). This is exactly what someone guessing the layout would see.

Entropy, correlation and PSNR/SSIM are computed over the first ``max_frames`` frames. NPCR/UACI
and key sensitivity are measured by re-encrypting the first original frame in memory with
fresh keys (the header gives the public parameters): plaintext sensitivity = one pixel
changed, key sensitivity = one key bit flipped.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .container import read_preamble
from .media import iter_streams, probe
from .metrics import correlations, entropy, npcr_uaci, planes, psnr, ssim
from .paper import read_records
from .paper_cipher import PaperCipher, PaperConfig
from .rsa_table import RSAParams

__all__ = ["analyze_files", "original_frames", "secure_frames", "recovered_fraction", "factor"]


def original_frames(path: str | Path, max_frames: int) -> tuple[list[np.ndarray], int]:
    """The first ``max_frames`` decoded frames of an AVI and the frame height."""
    info = probe(path)
    frames = []
    for kind, arr in iter_streams(path, info):
        if kind == "video":
            frames.append(arr)
            if len(frames) >= max_frames:
                break
    return frames, info.height


def secure_frames(
    path: str | Path, shape: tuple[int, ...], max_frames: int
) -> Iterator[np.ndarray]:
    """Secure-mode ciphertext bytes (without GCM tags) laid out as frames of ``shape``."""
    size = int(np.prod(shape))
    buf = bytearray()
    done = 0
    with open(path, "rb") as fh:
        fh.seek(read_preamble(fh, path).body_offset)
        while done < max_frames:
            rec = fh.read(5)
            if len(rec) < 5:
                break
            _, length = struct.unpack(">BI", rec)
            buf += fh.read(length)[:-16]
            while len(buf) >= size and done < max_frames:
                yield np.frombuffer(bytes(buf[:size]), dtype=np.uint8).reshape(shape)
                del buf[:size]
                done += 1


def factor(n: int) -> tuple[int, int]:
    """Trial-division factoring (instant for paper mode's moduli)."""
    for p in range(2, int(n**0.5) + 1):
        if n % p == 0:
            return p, n // p
    raise ValueError(f"{n} is prime")


def _frame_stats(orig: list[np.ndarray], enc: list[np.ndarray], levels: int, h: int) -> dict:
    scale = 255.0 / (levels - 1)
    o_planes = [p for f in orig for p in planes(f, h)]
    e_planes = [p for f in enc for p in planes(f, h)]
    views = [(p.astype(np.float64) * scale) for p in e_planes]
    return {
        "frames": len(enc),
        "levels": levels,
        "entropy": entropy(enc, levels),
        "entropy_max": float(np.log2(levels)),
        "entropy_original": entropy(orig, 256),
        "correlation": correlations(e_planes),
        "correlation_original": correlations(o_planes),
        "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(o_planes, views, strict=False)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(o_planes, views, strict=False)])),
    }


def _one_pixel_changed(frame: np.ndarray) -> np.ndarray:
    other = frame.copy()
    idx = tuple(s // 2 for s in frame.shape)
    other[idx] = (int(other[idx]) + 1) % 256
    return other


def _paper_experiments(h: dict[str, Any], frame: np.ndarray) -> dict[str, Any]:
    p, q = factor(int(h["n"]))
    cfg = PaperConfig(RSAParams(p, q, int(h["e"])), tuple(h["taps"]), int(h["layers"]))
    seed = 1 + int.from_bytes(os.urandom(2), "big") % ((1 << max(cfg.taps)) - 2)
    a = PaperCipher(cfg, seed)
    c1, c2 = a.encrypt_frame(frame), a.encrypt_frame(_one_pixel_changed(frame))
    k2 = PaperCipher(cfg, seed ^ 1).encrypt_frame(frame)
    top = (1 << cfg.rsa.bits) - 1
    npcr, uaci = npcr_uaci(c1, c2, top)
    knpcr, kuaci = npcr_uaci(c1, k2, top)
    t0 = time.perf_counter()
    dec = a.decrypt_frame(c1)
    t1 = time.perf_counter()
    a.encrypt_frame(frame)
    t2 = time.perf_counter()
    assert np.array_equal(dec, frame)
    return {
        "npcr": npcr,
        "uaci": uaci,
        "key_sensitivity_npcr": knpcr,
        "key_sensitivity_uaci": kuaci,
        "factored_n": [p, q],
        "core_encrypt_mb_s": frame.nbytes / 1e6 / max(t2 - t1, 1e-9),
        "core_decrypt_mb_s": frame.nbytes / 1e6 / max(t1 - t0, 1e-9),
    }


def _secure_experiments(frame: np.ndarray) -> dict[str, Any]:
    data, changed = frame.tobytes(), _one_pixel_changed(frame).tobytes()
    nonce = bytes(12)
    k1 = AESGCM.generate_key(bit_length=256)
    k2 = AESGCM.generate_key(bit_length=256)
    flipped = bytes([k1[0] ^ 1]) + k1[1:]

    def enc(key: bytes, msg: bytes) -> np.ndarray:
        return np.frombuffer(AESGCM(key).encrypt(nonce, msg, None)[:-16], dtype=np.uint8)

    c1 = enc(k1, data)
    npcr, uaci = npcr_uaci(c1, enc(k2, changed))
    same_npcr, _ = npcr_uaci(c1, enc(k1, changed))
    knpcr, kuaci = npcr_uaci(c1, enc(flipped, data))
    t0 = time.perf_counter()
    enc(k1, data)
    dt = time.perf_counter() - t0
    return {
        "npcr": npcr,
        "uaci": uaci,
        "npcr_if_key_and_nonce_were_reused": same_npcr,
        "key_sensitivity_npcr": knpcr,
        "key_sensitivity_uaci": kuaci,
        "core_encrypt_mb_s": len(data) / 1e6 / max(dt, 1e-9),
    }


def analyze_files(
    original: str | Path, encrypted: str | Path, max_frames: int = 10, png: str | Path | None = None
) -> dict[str, Any]:
    """Compute the analysis report (and optionally the PNG figure) for one encrypted file."""
    orig, height = original_frames(original, max_frames)
    with open(encrypted, "rb") as fh:
        pre = read_preamble(fh, encrypted)
        if pre.mode == "paper":
            fh.seek(pre.body_offset)
            enc = []
            for kind, arr in read_records(fh, pre.header):
                if kind == "video":
                    enc.append(arr)
                    if len(enc) >= len(orig):
                        break
            levels = 1 << int(pre.header["bits"])
    if pre.mode == "secure":
        enc = list(secure_frames(encrypted, orig[0].shape, len(orig)))
        levels = 256
    orig = orig[: len(enc)]
    size_in, size_out = Path(original).stat().st_size, Path(encrypted).stat().st_size
    report: dict[str, Any] = {
        "mode": pre.mode,
        "original": str(original),
        "encrypted": str(encrypted),
        "size_ratio": size_out / size_in,
    }
    if pre.mode == "paper":
        report["layers"] = int(pre.header["layers"])
    if enc:
        report.update(_frame_stats(orig, enc, levels, height))
        exp = _paper_experiments(pre.header, orig[0]) if pre.mode == "paper" else None
        report.update(exp or _secure_experiments(orig[0]))
        if png:
            from .plot import save_figure

            save_figure(png, orig[0], enc[0], levels, height, pre.mode)
            report["png"] = str(png)
    return report


def recovered_fraction(original: str | Path, recovered: str | Path) -> float:
    """Share of pixel values of ``recovered`` equal to the original (all frames)."""
    info = probe(original)
    a = (x for k, x in iter_streams(original, info) if k == "video")
    # read the recovered frames in the original's layout (rgb24 is stored as AVI's bgr24)
    theirs = dataclasses.replace(probe(recovered), pix_fmt=info.pix_fmt)
    b = (x for k, x in iter_streams(recovered, theirs) if k == "video")
    same = total = 0
    for x, y in zip_longest(a, b):
        if x is None:
            break
        total += x.size
        if y is not None and y.shape == x.shape:
            same += int(np.count_nonzero(x == y))
    return same / total if total else 0.0
