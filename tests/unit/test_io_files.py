"""Files written atomically get ordinary permissions and never leave temporaries behind."""

from __future__ import annotations

import os

import pytest

from slimtune.io import atomic_write, atomic_write_text


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        mode = (tmp_path / "a.json").stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o644  # as open() would create it, not mkstemp's 0o600


def test_failed_atomic_write_leaves_no_file(tmp_path):
    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "b.bin", broken)
    assert list(tmp_path.iterdir()) == []
