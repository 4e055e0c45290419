"""Inputs and outputs: pipes, existing files, keys, devices and links are never clobbered or
half-read; standard input and output go through ``-``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vidcrypt import api
from vidcrypt.cli import main
from vidcrypt.container import read_preamble, write_preamble
from vidcrypt.errors import ConfigError, IntegrityError


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_fifo_input_is_refused_without_hanging(tmp_path: Path, keypair) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a pipe or FIFO.*- to read standard input"):
        api.encrypt(fifo, tmp_path / "out.vcr", keypair[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fifo"]  # no .part left


def test_standard_input_and_output_through_dash(tiny_avi: Path, tmp_path: Path, keypair) -> None:
    """``cat in.avi | vidcrypt encrypt - out.vcr`` keeps every byte (the first 64 KiB too), and
    ``vidcrypt decrypt out.vcr -`` writes the original to standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    enc = tmp_path / "v.vcr"
    run = [sys.executable, "-m", "vidcrypt.cli"]
    with open(tiny_avi, "rb") as fh:
        r = subprocess.run([*run, "encrypt", "-", str(enc), "--key", str(keypair[1])],
                           stdin=fh, capture_output=True, env=env, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    r = subprocess.run([*run, "decrypt", str(enc), "-", "--key", str(keypair[0])],
                       capture_output=True, env=env, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == tiny_avi.read_bytes()  # the video, not the JSON summary
    assert json.loads(r.stderr.decode()[r.stderr.decode().index("{") :])["mode"] == "secure"


def test_outputs_that_exist_or_are_inputs_keys_links_or_devices_are_refused(
    tiny_avi: Path, tmp_path: Path, keypair, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = keypair
    enc = tmp_path / "v.vcr"
    assert _run(capsys, "encrypt", str(tiny_avi), str(enc), "--key", str(pub))[0] == 0
    key_bytes = priv.read_bytes()
    rc, _, err = _run(capsys, "decrypt", str(enc), str(priv), "--key", str(priv))
    assert rc == 1 and "is one of the inputs" in err and priv.read_bytes() == key_bytes
    rc, _, err = _run(capsys, "decrypt", str(enc), str(enc), "--key", str(priv), "--force")
    assert rc == 1 and "is one of the inputs" in err
    existing = tmp_path / "old.avi"
    existing.write_bytes(b"keep me")
    rc, _, err = _run(capsys, "decrypt", str(enc), str(existing), "--key", str(priv))
    assert rc == 1 and "exists; pass --force" in err and existing.read_bytes() == b"keep me"
    rc, _, _ = _run(capsys, "decrypt", str(enc), str(existing), "--key", str(priv), "--force")
    assert rc == 0 and existing.read_bytes() == tiny_avi.read_bytes()
    link = tmp_path / "link.avi"
    link.symlink_to(tmp_path / "target.avi")
    rc, _, err = _run(capsys, "decrypt", str(enc), str(link), "--key", str(priv), "--force")
    assert rc == 1 and "symbolic link" in err and not (tmp_path / "target.avi").exists()
    rc, _, err = _run(capsys, "decrypt", str(enc), "/dev/null", "--key", str(priv), "--force")
    assert rc == 1 and "is a device (write to standard output with -)" in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_keygen_never_replaces_keys_unasked_nor_follows_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "k"
    assert _run(capsys, "keygen", "--out", str(base), "--bits", "2048")[0] == 0
    first = Path(f"{base}.pem").read_bytes()
    rc, _, err = _run(capsys, "keygen", "--out", str(base), "--bits", "2048")
    assert rc == 1 and "exists; pass --force" in err and Path(f"{base}.pem").read_bytes() == first
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    victim.chmod(0o644)
    (tmp_path / "evil.pem").symlink_to(victim)
    rc, _, err = _run(capsys, "keygen", "--out", str(tmp_path / "evil"), "--force")
    assert rc == 1 and "symbolic link" in err
    assert victim.read_text() == "mine" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert _run(capsys, "keygen", "--out", str(base), "--bits", "2048", "--force")[0] == 0
    assert Path(f"{base}.pem").read_bytes() != first


def test_bench_refuses_a_workdir_with_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "test.avi").write_bytes(b"someone's video")
    rc, _, err = _run(capsys, "bench", "--quick", "--workdir", str(tmp_path))
    assert rc == 1 and "is not empty" in err
    assert (tmp_path / "test.avi").read_bytes() == b"someone's video"


def test_key_and_passphrase_checks(tmp_path: Path, tiny_avi: Path, keypair, capsys) -> None:
    pw = tmp_path / "pw"
    pw.write_text("\n")
    rc, _, err = _run(capsys, "keygen", "--out", str(tmp_path / "k"), "--passphrase-file", str(pw))
    assert rc == 1 and "is empty" in err and not (tmp_path / "k.pem").exists()
    priv, pub = keypair
    loose = tmp_path / "loose.pem"
    loose.write_bytes(priv.read_bytes())
    loose.chmod(0o644)
    enc = tmp_path / "v.vcr"
    api.encrypt(tiny_avi, enc, pub)
    rc, _, err = _run(capsys, "decrypt", str(enc), str(tmp_path / "o.avi"), "--key", str(loose))
    assert rc == 0 and "readable by others (mode 0644); chmod 600" in err


def test_a_paper_header_with_fps_zero_is_a_clear_error(tmp_path: Path, tiny_avi: Path, keypair):
    enc = tmp_path / "p.vcr"
    api.encrypt(tiny_avi, enc, keypair[1], mode="paper", seed=5)
    with open(enc, "rb") as fh:
        pre = read_preamble(fh, enc)
        fh.seek(pre.body_offset)
        body = fh.read()
    bad = tmp_path / "bad.vcr"
    with open(bad, "wb") as fh:
        write_preamble(fh, 2, {**pre.header, "fps": "0"})
        fh.write(body)
    with pytest.raises(IntegrityError, match="frame rate and size must be positive"):
        api.decrypt(bad, tmp_path / "o.avi", keypair[0])
