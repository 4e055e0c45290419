"""High-level entry points used by the CLI: encrypt and decrypt files in either mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .container import read_preamble
from .errors import ConfigError
from .keys import load_private_key, load_public_key
from .media import probe
from .paper import decrypt_file as paper_decrypt
from .paper import encrypt_file as paper_encrypt
from .paper_cipher import PaperConfig
from .paths import STDIO, check_input, check_output, spooled_input, to_stdout
from .secure import SecureConfig
from .secure import decrypt_file as secure_decrypt
from .secure import encrypt_file as secure_encrypt

__all__ = ["MODES", "encrypt", "decrypt", "file_mode"]

MODES = ("secure", "paper")


def encrypt(
    src: str | Path,
    dst: str | Path,
    public_key: str | Path,
    mode: str = "secure",
    paper: PaperConfig | None = None,
    secure: SecureConfig | None = None,
    seed: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Encrypt the AVI ``src`` into ``dst`` for the holder of ``public_key``.

    Args:
        src: Input AVI (checked with FFmpeg before anything is written).
        dst: Output vidcrypt file, written atomically.
        public_key: PEM public key path.
        mode: ``"secure"`` (default) or ``"paper"``.
        paper: Parameters of paper mode.
        secure: Parameters of secure mode.
        seed: Paper mode's PN seed (random when omitted).
        force: replace an existing output file (:func:`vidcrypt.paths.check_output`).

    ``src`` may be ``-`` (standard input, spooled to a temporary file first) and ``dst`` ``-``
    (standard output, written once the file is complete).

    Returns:
        Statistics of the run, including ``mode``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if str(src) != STDIO:
        check_input(src)
    if str(dst) != STDIO:
        check_output(dst, force=force, protect=(src, public_key))
    key = load_public_key(public_key)
    with spooled_input(src) as source, to_stdout(dst) as out:
        probe(source)
        if mode == "secure":
            stats = secure_encrypt(source, out, key, secure)
        else:
            stats = paper_encrypt(source, out, key, paper, seed)
    return {"mode": mode, **stats}


def file_mode(path: str | Path) -> str:
    """Return ``"secure"`` or ``"paper"`` for a vidcrypt file (raises if it is not one)."""
    with open(check_input(path), "rb") as fh:
        return read_preamble(fh, path).mode


def decrypt(
    src: str | Path,
    dst: str | Path,
    private_key: str | Path,
    passphrase: bytes | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Decrypt a vidcrypt file; the mode is read from its header.

    Secure files decrypt to the exact original bytes; paper files decrypt to an AVI holding
    the original decoded frames (FFV1 or rawvideo) and 16-bit PCM audio. ``src``/``dst`` may be
    ``-`` as in :func:`encrypt`; an existing output is replaced only with ``force``, and never
    when it is the input or the key.
    """
    if str(src) != STDIO:
        check_input(src)
    if str(dst) != STDIO:
        check_output(dst, force=force, protect=(src, private_key))
    key = load_private_key(private_key, passphrase)
    with spooled_input(src) as source, to_stdout(dst) as out:
        try:
            with open(source, "rb") as fh:
                pre = read_preamble(fh, source)
        except OSError as exc:
            raise ConfigError(f"cannot read {src}: {exc.strerror}") from exc
        if pre.mode == "secure":
            stats = secure_decrypt(source, out, key, pre)
        else:
            stats = paper_decrypt(source, out, key, pre)
    return {"mode": pre.mode, **stats}
