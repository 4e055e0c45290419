"""The command-line interface end to end (in-process)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from vidcrypt.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def test_keygen_encrypt_decrypt_with_passphrase(
    tiny_avi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = tmp_path / "pw.txt"
    pw.write_text("correct horse\n")
    base = tmp_path / "k"
    rc, res, _ = _run(
        capsys, "keygen", "--out", str(base), "--bits", "2048", "--passphrase-file", str(pw)
    )
    assert rc == 0 and len(res["fingerprint"]) == 64
    priv, pub = Path(f"{base}.pem"), Path(f"{base}.pub.pem")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"ENCRYPTED" in priv.read_bytes()

    enc, dec = tmp_path / "v.vcr", tmp_path / "v.avi"
    rc, res, _ = _run(capsys, "encrypt", str(tiny_avi), str(enc), "--key", str(pub))
    assert rc == 0 and res["mode"] == "secure"
    rc, _, err = _run(capsys, "decrypt", str(enc), str(dec), "--key", str(priv))
    assert rc == 1 and "passphrase" in err and not dec.exists()
    rc, res, _ = _run(
        capsys, "decrypt", str(enc), str(dec), "--key", str(priv), "--passphrase-file", str(pw)
    )
    assert rc == 0 and dec.read_bytes() == tiny_avi.read_bytes()


def test_cli_errors_exit_nonzero_without_output(
    tiny_avi: Path,
    keypair: tuple[Path, Path],
    other_keypair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    priv, pub = keypair
    enc, dec = tmp_path / "v.vcr", tmp_path / "v.avi"
    rc, _, _ = _run(
        capsys, "encrypt", str(tiny_avi), str(enc), "--key", str(pub), "--mode", "paper"
    )
    assert rc == 0
    rc, _, err = _run(capsys, "decrypt", str(enc), str(dec), "--key", str(other_keypair[0]))
    assert rc == 1 and "wrong key" in err and not dec.exists()
    data = enc.read_bytes()
    enc.write_bytes(data[: len(data) // 2])
    rc, _, err = _run(capsys, "decrypt", str(enc), str(dec), "--key", str(priv))
    assert rc == 1 and "truncated" in err and not dec.exists()
    rc, _, err = _run(capsys, "encrypt", str(tmp_path / "missing.avi"), str(enc), "--key", str(pub))
    assert rc == 1 and "missing.avi" in err
    rc, _, err = _run(
        capsys, "encrypt", str(tiny_avi), str(enc), "--key", str(pub), "--mode", "paper", "--e", "3"
    )
    assert rc == 1 and "coprime" in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_paper_cli_and_attack(
    tiny_avi: Path, keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = keypair
    enc, rec = tmp_path / "v.vcr", tmp_path / "rec.avi"
    rc, res, _ = _run(
        capsys,
        "encrypt",
        str(tiny_avi),
        str(enc),
        "--key",
        str(pub),
        "--mode",
        "paper",
        "--layers",
        "1",
    )
    assert rc == 0 and res["frames"] == 10 and res["bytes_out"] > res["plaintext_bytes"]
    rc, res, _ = _run(
        capsys,
        "attack",
        str(enc),
        "--key",
        str(pub),
        "--out",
        str(rec),
        "--original",
        str(tiny_avi),
    )
    assert rc == 0 and res["recovered_fraction"] == 1.0
