"""Exception types raised by vidcrypt; the CLI maps each to a clear message and exit code."""

from __future__ import annotations

__all__ = [
    "VidcryptError",
    "UnsupportedFileError",
    "WrongKeyError",
    "IntegrityError",
    "ConfigError",
]


class VidcryptError(Exception):
    """Base class of every error vidcrypt reports to the user."""


class ConfigError(VidcryptError, ValueError):
    """A parameter (prime, exponent, polynomial, chunk size, ...) is invalid."""


class UnsupportedFileError(VidcryptError):
    """The input is not a file vidcrypt can read (not AVI, no video stream, bad magic)."""


class WrongKeyError(VidcryptError):
    """The key given does not match the file (fingerprint mismatch or unwrap failure)."""


class IntegrityError(VidcryptError):
    """The encrypted file was modified, truncated, reordered or is corrupt."""
