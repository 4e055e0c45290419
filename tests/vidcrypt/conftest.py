"""Shared fixtures for the vidcrypt tests: one RSA key pair and tiny generated AVIs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cryptography")

from vidcrypt.keys import generate_keypair  # noqa: E402
from vidcrypt.media import iter_streams, make_test_video, probe  # noqa: E402


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) PEM paths of a 2048-bit key."""
    return generate_keypair(tmp_path_factory.mktemp("keys") / "alice", bits=2048)


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second, unrelated key pair."""
    return generate_keypair(tmp_path_factory.mktemp("keys2") / "mallory", bits=2048)


@pytest.fixture(scope="session")
def tiny_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x24 bgr24 rawvideo, 10 frames at 25 fps, stereo 8 kHz PCM audio."""
    path = tmp_path_factory.mktemp("media") / "tiny.avi"
    return make_test_video(path, 32, 24, seconds=0.4, fps=25, audio_rate=8000, channels=2)


@pytest.fixture(scope="session")
def tiny_yuv_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x24 yuv420p FFV1, 10 frames, mono 8 kHz audio."""
    path = tmp_path_factory.mktemp("media") / "tiny_yuv.avi"
    return make_test_video(path, 32, 24, 0.4, 25, 8000, 1, pix_fmt="yuv420p", codec="ffv1", seed=1)


def _streams(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    info = probe(path)
    video, audio = [], []
    for kind, arr in iter_streams(path, info):
        (video if kind == "video" else audio).append(arr)
    pcm = np.concatenate(audio) if audio else np.zeros((0, 1), np.int16)
    return video, pcm


@pytest.fixture(scope="session")
def read_streams() -> Callable[[Path], tuple[list[np.ndarray], np.ndarray]]:
    """Function returning (video frames, concatenated int16 audio) of an AVI."""
    return _streams
