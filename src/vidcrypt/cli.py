"""Command-line interface: ``vidcrypt keygen|encrypt|decrypt|analyze|attack|bench``.

Every command prints a JSON summary on stdout. Errors (wrong key, tampered or truncated input,
unsupported file, bad parameter) print ``vidcrypt: error: ...`` on stderr and exit with 1;
nothing partial is left under the output name.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, VidcryptError

__all__ = ["main", "build_parser"]


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes | None:
    if getattr(args, "passphrase_file", None):
        try:
            text = Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {args.passphrase_file}") from exc
        if not text:
            raise ConfigError(f"passphrase file {args.passphrase_file} is empty")
        return text
    if getattr(args, "passphrase", False):
        first = getpass.getpass("Passphrase: ").encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
            raise ConfigError("the two passphrases differ")
        return first or None
    return None


def _cmd_keygen(args: argparse.Namespace) -> dict[str, Any]:
    from .keys import fingerprint, generate_keypair, load_public_key

    priv, pub = generate_keypair(
        args.out, args.bits, _passphrase(args, confirm=True), force=args.force
    )
    return {
        "private": str(priv),
        "public": str(pub),
        "fingerprint": fingerprint(load_public_key(pub)),
    }


def _cmd_encrypt(args: argparse.Namespace) -> dict[str, Any]:
    from .api import encrypt
    from .paper_cipher import PaperConfig
    from .rsa_table import RSAParams
    from .secure import SecureConfig

    paper = PaperConfig(
        RSAParams(args.p, args.q, args.e),
        tuple(int(t) for t in args.taps.split(",")),
        args.layers,
        args.audio_block,
    )
    return encrypt(
        args.input,
        args.output,
        args.key,
        args.mode,
        paper,
        SecureConfig(args.chunk_size),
        args.seed,
        force=args.force,
    )


def _cmd_decrypt(args: argparse.Namespace) -> dict[str, Any]:
    from .api import decrypt

    return decrypt(args.input, args.output, args.key, _passphrase(args), force=args.force)


def _cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from .analyze import analyze_files

    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    report = analyze_files(args.original, args.encrypted, max_frames=args.frames, png=png)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _cmd_attack(args: argparse.Namespace) -> dict[str, Any]:
    from .attack import attack_file
    from .paths import check_output

    check_output(args.out, force=args.force, protect=(args.encrypted, args.key, args.original))
    stats = attack_file(args.encrypted, args.out, args.key)
    if args.original:
        from .analyze import recovered_fraction

        stats["recovered_fraction"] = recovered_fraction(args.original, args.out)
    return stats


def _cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench import run_bench

    work = Path(args.workdir) if args.workdir else None
    if work is not None and work.is_dir() and any(work.iterdir()) and not args.force:
        raise ConfigError(
            f"--workdir {args.workdir} is not empty; the benchmark writes its files there "
            "(pass --force to let it replace them)"
        )
    return run_bench(quick=args.quick, out=args.out, workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for all sub-commands."""
    ap = argparse.ArgumentParser(prog="vidcrypt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    kg = sub.add_parser("keygen", help="write KEYBASE.pem (0600) and KEYBASE.pub.pem")
    kg.add_argument("--out", required=True, help="key base path")
    kg.add_argument("--bits", type=int, default=3072, help="RSA modulus size (default 3072)")
    kg.add_argument("--force", action="store_true", help="replace existing key files")
    _pass_args(kg)
    kg.set_defaults(func=_cmd_keygen)

    en = sub.add_parser("encrypt", help="encrypt an AVI")
    en.add_argument("input", help="AVI to encrypt (- = standard input)")
    en.add_argument("output", help="vidcrypt file to write (- = standard output)")
    en.add_argument("--key", required=True, help="recipient public key (PEM)")
    en.add_argument("--force", action="store_true", help="replace an existing output file")
    en.add_argument("--mode", choices=("secure", "paper"), default="secure")
    en.add_argument("--layers", type=int, default=2, help="paper: 1 = RSA only, 2 = RSA + PN")
    en.add_argument("--p", type=int, default=17, help="paper: RSA prime p (default 17)")
    en.add_argument("--q", type=int, default=19, help="paper: RSA prime q (default 19)")
    en.add_argument("--e", type=int, default=5, help="paper: RSA exponent e (default 5)")
    en.add_argument("--taps", default="16,14,13,11", help="paper: LFSR polynomial exponents")
    en.add_argument("--seed", type=int, default=None, help="paper: LFSR seed (default random)")
    en.add_argument("--audio-block", type=int, default=1024, help="paper: audio DCT block")
    en.add_argument("--chunk-size", type=int, default=1 << 20, help="secure: bytes per chunk")
    en.set_defaults(func=_cmd_encrypt)

    de = sub.add_parser("decrypt", help="decrypt a vidcrypt file (mode read from the header)")
    de.add_argument("input", help="vidcrypt file (- = standard input)")
    de.add_argument("output", help="file to write (- = standard output)")
    de.add_argument("--key", required=True, help="private key (PEM)")
    de.add_argument("--force", action="store_true", help="replace an existing output file")
    _pass_args(de)
    de.set_defaults(func=_cmd_decrypt)

    an = sub.add_parser("analyze", help="security and quality metrics, JSON + PNG")
    an.add_argument("original")
    an.add_argument("encrypted")
    an.add_argument("--json", default=None, help="write the report here (PNG next to it)")
    an.add_argument("--png", default=None, help="figure path (default: JSON path with .png)")
    an.add_argument("--frames", type=int, default=10, help="frames to analyse (default 10)")
    an.set_defaults(func=_cmd_analyze)

    at = sub.add_parser("attack", help="recover a paper-mode file from public data only")
    at.add_argument("encrypted")
    at.add_argument("--key", default=None, help="recipient public key (only checked)")
    at.add_argument("--out", required=True, help="recovered AVI")
    at.add_argument("--force", action="store_true", help="replace an existing output file")
    at.add_argument("--original", default=None, help="original AVI, to score the recovery")
    at.set_defaults(func=_cmd_attack)

    be = sub.add_parser("bench", help="benchmark both modes on a generated video")
    be.add_argument("--quick", action="store_true", help="shorter video, fewer repeats")
    be.add_argument("--out", default=None, help="write the JSON results here")
    be.add_argument("--workdir", default=None, help="keep generated files here")
    be.add_argument("--force", action="store_true", help="let --workdir's files be replaced")
    be.set_defaults(func=_cmd_bench)
    return ap


def _pass_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passphrase", action="store_true", help="prompt for a key passphrase")
    g.add_argument("--passphrase-file", default=None, help="read the passphrase from a file")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 error, 2 usage)."""
    import av

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except VidcryptError as exc:
        print(f"vidcrypt: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, av.FFmpegError) as exc:
        print(f"vidcrypt: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    # the output went to standard output (-): the summary goes to standard error
    to_err = getattr(args, "output", None) == "-"
    print(json.dumps(result, indent=2, default=str), file=sys.stderr if to_err else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
