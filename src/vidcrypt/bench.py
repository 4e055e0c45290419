"""`vidcrypt bench`: speed and security figures of both modes on a generated AVI.

Speeds are MB (10^6 bytes) of the *input AVI* per second; the test video is rawvideo, so its
bytes are the frame bytes (plus 3 % audio). Secure mode's ``encrypt_mb_s`` times the streaming
loop file to file (open the input, read, seal, write the output, rename it into place);
``*_wall_mb_s`` also counts probing the AVI and the RSA-OAEP key
wrap/unwrap and loading the PEM private key (OpenSSL validates it: a fixed cost of up to a
second for 3072-bit keys). ``aes_gcm_limit_mb_s`` seals the same bytes, already in memory, in
the same chunk size: the ceiling; it is measured interleaved with the secure-mode runs so both
see the same machine load. Container decode/encode (PyAV) is reported separately under
``container``. Each timing is the best of its runs. Files live in /dev/shm when available so
disk write-back does not distort the timings.

Secure mode and the ceiling take the best of ``5 * repeats`` interleaved runs (15; 5 with
``quick``; it was 7 and 3): one run takes about 20 ms, so on a shared machine a single busy
moment would otherwise decide the figure. Before each run the previous run's output files are
deleted (outside the timing), so every run writes new files as a first run does, instead of
also paying for freeing the 30 MB file it replaces.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cryptography
import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import api
from .analyze import analyze_files, recovered_fraction
from .attack import attack_file
from .errors import VidcryptError
from .keys import generate_keypair
from .lfsr import LFSRConfig, berlekamp_massey, lfsr_bits, lfsr_period
from .media import AviWriter, iter_streams, make_test_video, probe
from .paper_cipher import PaperConfig
from .rsa_table import RSAParams, fixed_points

__all__ = ["run_bench", "aes_gcm_limit"]

MB = 1e6


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if time.perf_counter() - t0 < best:
            best, result = time.perf_counter() - t0, out
    return best, result


def aes_gcm_limit(data: bytes, chunk: int = 1 << 20, repeats: int = 3) -> tuple[float, float]:
    """In-memory AES-256-GCM seal and open speed (MB/s) of ``data`` in ``chunk``-byte pieces.

    Uses ``encrypt_into``/``decrypt_into`` with preallocated outputs (no allocation, no I/O):
    the fastest way this library offers, hence the ceiling for secure mode.
    """
    gcm = AESGCM(AESGCM.generate_key(bit_length=256))
    view = memoryview(data)
    pieces = [view[i : i + chunk] for i in range(0, len(data), chunk)]
    nonces = [i.to_bytes(12, "big") for i in range(len(pieces))]
    sealed = [bytearray(len(p) + 16) for p in pieces]
    opened = bytearray(chunk)

    def seal() -> None:
        for n, p, out in zip(nonces, pieces, sealed, strict=True):
            gcm.encrypt_into(n, p, b"aad", out)

    def unseal() -> None:
        for n, c in zip(nonces, sealed, strict=True):
            gcm.decrypt_into(n, c, b"aad", memoryview(opened)[: len(c) - 16])

    t_enc, _ = _best(seal, repeats)
    t_dec, _ = _best(unseal, repeats)
    return len(data) / MB / t_enc, len(data) / MB / t_dec


def _container(src: Path, work: Path) -> dict[str, float]:
    info = probe(src)
    t0 = time.perf_counter()
    items = list(iter_streams(src, info))
    t_dec = time.perf_counter() - t0
    raw = sum(a.nbytes for _, a in items)
    t0 = time.perf_counter()
    with AviWriter(work / "reencode.avi", info) as out:
        for kind, arr in items:
            (out.write_video if kind == "video" else out.write_audio)(arr)
    t_enc = time.perf_counter() - t0
    return {"decode_mb_s": raw / MB / t_dec, "encode_mb_s": raw / MB / t_enc}


def _frames_equal(a: Path, b: Path) -> bool:
    va = (x for k, x in iter_streams(a, probe(a)) if k == "video")
    vb = (x for k, x in iter_streams(b, probe(b)) if k == "video")
    return all(np.array_equal(x, y) for x, y in zip(va, vb, strict=True))


def _paper(src: Path, work: Path, priv: Path, pub: Path, repeats: int) -> dict[str, Any]:
    size = src.stat().st_size
    enc, dec = work / "paper.vcr", work / "paper.avi"
    t_enc, st = _best(lambda: api.encrypt(src, enc, pub, mode="paper"), repeats)
    t_dec, _ = _best(lambda: api.decrypt(enc, dec, priv), repeats)
    rep = analyze_files(src, enc, max_frames=10, png=work / "paper.png")
    rsa = RSAParams()
    bits = lfsr_bits(LFSRConfig(seed=0xACE1))
    return {
        "encrypt_mb_s": size / MB / t_enc,
        "decrypt_mb_s": size / MB / t_dec,
        "encrypt_frames_s": st["frames"] / t_enc,
        "decrypt_frames_s": st["frames"] / t_dec,
        "transform_mb_s": st["plaintext_bytes"] / MB / st["transform_seconds"],
        "size_ratio": enc.stat().st_size / size,
        "round_trip_exact": _frames_equal(src, dec),
        "entropy": rep["entropy"],
        "entropy_max": rep["entropy_max"],
        "correlation": rep["correlation"],
        "psnr_db": rep["psnr_db"],
        "ssim": rep["ssim"],
        "npcr": rep["npcr"],
        "uaci": rep["uaci"],
        "key_sensitivity_npcr": rep["key_sensitivity_npcr"],
        "rsa_fixed_points": fixed_points(rsa),
        "lfsr_period": lfsr_period(LFSRConfig()),
        "lfsr_linear_complexity_from_32_bits": berlekamp_massey(bits[:32])[0],
    }


def _single_layer(src: Path, work: Path, pub: Path) -> dict[str, Any]:
    enc = work / "paper1.vcr"
    api.encrypt(src, enc, pub, mode="paper", paper=PaperConfig(layers=1))
    rep = analyze_files(src, enc, max_frames=10, png=work / "paper1.png")
    return {k: rep[k] for k in ("entropy", "entropy_original", "correlation", "psnr_db", "ssim")}


def _secure(src: Path, work: Path, priv: Path, pub: Path, repeats: int) -> dict[str, Any]:
    size = src.stat().st_size
    enc, dec = work / "secure.vcr", work / "secure.avi"
    runs = 5 * repeats
    data = src.read_bytes()
    best = {"limit_enc": 0.0, "limit_dec": 0.0, "enc": 0.0, "dec": 0.0, "wall_enc": 0.0}
    best["wall_dec"] = 0.0
    # Interleave the in-memory ceiling with the file pipeline so both see the same machine load.
    for _ in range(runs):
        lim_enc, lim_dec = aes_gcm_limit(data, repeats=1)
        # Each run writes new output files, like a first run: replacing the previous run's
        # 30 MB outputs (freeing their pages, ~3 ms each) is not part of encrypting a file.
        enc.unlink(missing_ok=True)
        dec.unlink(missing_ok=True)
        t0 = time.perf_counter()
        st_enc = api.encrypt(src, enc, pub)
        t1 = time.perf_counter()
        st_dec = api.decrypt(enc, dec, priv)
        t2 = time.perf_counter()
        for key, val in (
            ("limit_enc", lim_enc),
            ("limit_dec", lim_dec),
            ("enc", size / MB / st_enc["seconds"]),
            ("dec", size / MB / st_dec["seconds"]),
            ("wall_enc", size / MB / (t1 - t0)),
            ("wall_dec", size / MB / (t2 - t1)),
        ):
            best[key] = max(best[key], val)
    rep = analyze_files(src, enc, max_frames=10, png=work / "secure.png")
    bad = bytearray(enc.read_bytes())
    bad[len(bad) // 2] ^= 1
    (work / "tampered.vcr").write_bytes(bytes(bad))
    try:
        api.decrypt(work / "tampered.vcr", work / "tampered.avi", priv)
        detected = False
    except VidcryptError:
        detected = not (work / "tampered.avi").exists()
    return {
        "encrypt_mb_s": best["enc"],
        "decrypt_mb_s": best["dec"],
        "encrypt_wall_mb_s": best["wall_enc"],
        "decrypt_wall_mb_s": best["wall_dec"],
        "aes_gcm_limit_mb_s": best["limit_enc"],
        "aes_gcm_open_limit_mb_s": best["limit_dec"],
        "encrypt_fraction_of_limit": best["enc"] / best["limit_enc"],
        "decrypt_fraction_of_limit": best["dec"] / best["limit_dec"],
        "size_ratio": enc.stat().st_size / size,
        "round_trip_exact": dec.read_bytes() == src.read_bytes(),
        "tamper_detected": detected,
        "entropy": rep["entropy"],
        "correlation": rep["correlation"],
        "psnr_db": rep["psnr_db"],
        "ssim": rep["ssim"],
        "npcr": rep["npcr"],
        "uaci": rep["uaci"],
        "key_sensitivity_npcr": rep["key_sensitivity_npcr"],
    }


def _attack(src: Path, work: Path, pub: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layers, prefix in ((1, ""), (2, "two_layer_")):
        enc, rec = work / f"attack{layers}.vcr", work / f"attack{layers}.avi"
        api.encrypt(src, enc, pub, mode="paper", paper=PaperConfig(layers=layers), seed=0x5EED)
        st = attack_file(enc, rec, pub)
        out[f"{prefix}recovered_fraction"] = recovered_fraction(src, rec)
        out[f"{prefix}seconds"] = st["seconds"]
        if layers == 2:
            out["two_layer_seed_recovered"] = st["recovered_seed"] == 0x5EED
    return out


def run_bench(
    quick: bool = False, out: str | Path | None = None, workdir: str | Path | None = None
) -> dict[str, Any]:
    """Run the benchmark; optionally write the JSON to ``out``. Returns the results."""
    seconds, repeats = (2.0, 1) if quick else (5.0, 3)
    # A RAM-backed folder keeps disk write-back stalls out of the crypto timings.
    ram = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="vidcrypt-bench-", dir=ram) as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        src = make_test_video(work / "test.avi", 320, 240, seconds, 25, 44100, 2)
        priv, pub = generate_keypair(work / "bench", bits=3072, force=True)
        res: dict[str, Any] = {
            "meta": {
                "quick": quick,
                "video": f"320x240 bgr24 rawvideo, {seconds:g} s at 25 fps, 44.1 kHz stereo s16",
                "input_bytes": src.stat().st_size,
                "rsa_key_bits": 3072,
                "repeats": repeats,
                "workdir_ram_backed": workdir is None and ram is not None,
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "pyav": av.__version__,
                "cryptography": cryptography.__version__,
            },
            "container": _container(src, work),
            "paper": _paper(src, work, priv, pub, repeats),
            "paper_single_layer": _single_layer(src, work, pub),
            "secure": _secure(src, work, priv, pub, repeats),
            "attack": _attack(src, work, pub),
        }
        res["aes_gcm_limit_mb_s"] = res["secure"].pop("aes_gcm_limit_mb_s")
        res["aes_gcm_open_limit_mb_s"] = res["secure"].pop("aes_gcm_open_limit_mb_s")
        res["meta"]["bench_seconds"] = time.perf_counter() - t0
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
    return res
