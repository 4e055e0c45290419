"""RSA key pairs (PEM files), fingerprints and RSA-OAEP key wrapping.

``keygen`` writes ``BASE.pem`` (PKCS#8 private key, file mode 0600, optionally encrypted with a
passphrase) and ``BASE.pub.pem`` (SubjectPublicKeyInfo). Files record the SHA-256 fingerprint of
the recipient's public key so that a wrong key is reported as such before any decryption.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import ConfigError, WrongKeyError
from .paths import check_output

__all__ = [
    "generate_keypair",
    "load_public_key",
    "load_private_key",
    "fingerprint",
    "wrap_key",
    "unwrap_key",
]

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def generate_keypair(
    base: str | Path, bits: int = 3072, passphrase: bytes | None = None, force: bool = False
) -> tuple[Path, Path]:
    """Generate an RSA key pair and write ``BASE.pem`` (0600) and ``BASE.pub.pem``.

    Args:
        base: Output path without extension.
        bits: Modulus size, at least 2048.
        passphrase: If given, the private key file is encrypted with it (an empty one is
            refused: it would silently write an unencrypted key).
        force: replace existing key files (never through a symbolic link).

    Returns:
        The private and public key paths.
    """
    if passphrase is not None and not passphrase:
        raise ConfigError("the passphrase is empty; give one, or none for an unencrypted key")
    base = Path(base)
    priv_path, pub_path = Path(f"{base}.pem"), Path(f"{base}.pub.pem")
    for p in (priv_path, pub_path):
        check_output(p, force=force)
    if bits < 2048:
        raise ConfigError(f"RSA key size must be at least 2048 bits, got {bits}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(priv_path, priv, 0o600)
    _write_new(pub_path, pub, 0o644)
    return priv_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a fresh file with ``mode`` beside ``path`` (never following a link), then rename
    it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from exc


def load_public_key(path: str | Path) -> rsa.RSAPublicKey:
    """Load an RSA public key; a private key file is accepted and its public half used."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{path} is not a PEM RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an RSA key")
    return key


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> rsa.RSAPrivateKey:
    """Load a PEM RSA private key, optionally protected by ``passphrase``.

    A key file that others may read (group or world permission bits) is used, with a warning
    on standard error naming the file and the fix.
    """
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if os.name == "posix" and mode & 0o077:
            print(
                f"vidcrypt: warning: private key {path} is readable by others "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 {path}",
                file=sys.stderr,
            )
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise WrongKeyError(f"{path}: {exc} (use --passphrase)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise WrongKeyError(f"{path} is not a PEM private key or the passphrase is wrong") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an RSA private key")
    return key


def fingerprint(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """SHA-256 hex digest of the DER SubjectPublicKeyInfo of the (public half of the) key."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def wrap_key(public: rsa.RSAPublicKey, secret: bytes) -> bytes:
    """Encrypt ``secret`` with RSA-OAEP (SHA-256, MGF1-SHA-256)."""
    return public.encrypt(secret, _OAEP)


def unwrap_key(private: rsa.RSAPrivateKey, wrapped: bytes, expected_fp: str) -> bytes:
    """Check the key fingerprint, then decrypt an RSA-OAEP wrapped secret.

    Raises:
        WrongKeyError: if the key is not the file's recipient or unwrapping fails.
    """
    have = fingerprint(private)
    if have != expected_fp:
        raise WrongKeyError(
            f"wrong key: the file is encrypted for key {expected_fp[:16]}..., "
            f"the given key is {have[:16]}..."
        )
    try:
        return private.decrypt(wrapped, _OAEP)
    except ValueError as exc:
        raise WrongKeyError("wrong key: RSA-OAEP unwrapping of the file key failed") from exc
