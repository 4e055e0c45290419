"""`paper` mode: array transforms, file round trips and the public-key attack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidcrypt import api
from vidcrypt.attack import attack_file, recover_seed
from vidcrypt.errors import ConfigError
from vidcrypt.paper_cipher import PaperCipher, PaperConfig


def test_frame_round_trip_and_value_range() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for layers in (1, 2):
        cipher = PaperCipher(PaperConfig(layers=layers), seed=0x1F2E)
        enc = cipher.encrypt_frame(frame)
        assert enc.dtype == np.uint16 and enc.shape == frame.shape
        assert int(enc.max()) < 512
        assert np.array_equal(cipher.decrypt_frame(enc), frame)


def test_single_layer_is_a_fixed_substitution() -> None:
    cipher = PaperCipher(PaperConfig(layers=1), seed=1)
    frame = np.array([[0, 1, 2, 2, 255]], dtype=np.uint8)
    enc = cipher.encrypt_frame(frame)
    assert enc.tolist() == [[0, 1, 32, 32, pow(255, 5, 323)]]


def test_keystream_is_reused_across_frames() -> None:
    cipher = PaperCipher(PaperConfig(), seed=99)
    a = np.full((8, 8), 10, np.uint8)
    b = np.full((8, 8), 200, np.uint8)
    # XOR of two ciphertexts does not depend on the key: a two-time pad.
    x = cipher.encrypt_frame(a) ^ cipher.encrypt_frame(b)
    other = PaperCipher(PaperConfig(), seed=12345)
    assert np.array_equal(x, other.encrypt_frame(a) ^ other.encrypt_frame(b))


def test_audio_round_trip_is_exact() -> None:
    rng = np.random.default_rng(1)
    pcm = rng.integers(-32768, 32768, (3000, 2), dtype=np.int16)
    for layers in (1, 2):
        cipher = PaperCipher(PaperConfig(layers=layers, audio_block=256), seed=77)
        enc = cipher.encrypt_audio(pcm, start=500)
        assert enc.dtype == np.float32 and enc.size == pcm.size
        dec = cipher.decrypt_audio(enc, start=500).reshape(pcm.shape)
        assert int(np.abs(dec.astype(int) - pcm).max()) <= 1
        assert np.array_equal(dec, pcm)


def test_paper_config_validation() -> None:
    with pytest.raises(ConfigError, match="layers"):
        PaperConfig(layers=3)
    with pytest.raises(ConfigError, match="audio_block"):
        PaperConfig(audio_block=2)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("fixture", ["tiny_avi", "tiny_yuv_avi"])
def test_paper_file_round_trip(
    layers: int, fixture: str, keypair: tuple[Path, Path], tmp_path: Path, request, read_streams
) -> None:
    src = request.getfixturevalue(fixture)
    priv, pub = keypair
    enc, dec = tmp_path / "v.vcr", tmp_path / "v.avi"
    stats = api.encrypt(src, enc, pub, mode="paper", paper=PaperConfig(layers=layers))
    assert stats["frames"] == 10
    assert api.file_mode(enc) == "paper"
    assert api.decrypt(enc, dec, priv)["frames"] == 10
    v0, a0 = read_streams(src)
    v1, a1 = read_streams(dec)
    assert len(v0) == len(v1) == 10
    assert all(np.array_equal(x, y) for x, y in zip(v0, v1, strict=True))
    assert a0.shape == a1.shape and a0.size > 0
    assert int(np.abs(a0.astype(int) - a1).max()) <= 1


@pytest.mark.parametrize("layers", [1, 2])
def test_attack_recovers_paper_mode_without_private_key(
    layers: int, tiny_avi: Path, keypair: tuple[Path, Path], tmp_path: Path, read_streams
) -> None:
    _, pub = keypair
    enc, rec = tmp_path / "v.vcr", tmp_path / "rec.avi"
    api.encrypt(tiny_avi, enc, pub, mode="paper", paper=PaperConfig(layers=layers), seed=4242)
    stats = attack_file(enc, rec, pub)
    assert stats["invalid_values"] == 0
    assert stats["key_matches_header"] is True
    if layers == 2:
        assert stats["recovered_seed"] == 4242
    v0, a0 = read_streams(tiny_avi)
    v1, a1 = read_streams(rec)
    fraction = np.mean([np.mean(x == y) for x, y in zip(v0, v1, strict=True)])
    assert fraction >= 0.99
    if layers == 2:
        assert np.array_equal(a0, a1)


def test_recover_seed_from_one_frame() -> None:
    frame = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    enc = PaperCipher(PaperConfig(), seed=0xACE1).encrypt_frame(frame)
    seed, candidates = recover_seed(enc, 323, 5, (16, 14, 13, 11))
    assert (seed, candidates) == (0xACE1, 1)


def _mjpeg(path: Path) -> Path:
    """An MJPEG AVI encoded by FFmpeg (through PyAV): red left, blue right, a green band."""
    import av

    with av.open(str(path), "w", format="avi") as box:
        st = box.add_stream("mjpeg", rate=25)
        st.width, st.height, st.pix_fmt = 32, 24, "yuvj420p"
        for i in range(4):
            rgb = np.zeros((24, 32, 3), np.uint8)
            rgb[:, :16, 0] = 220
            rgb[:, 16:, 2] = 200
            rgb[8:16, :, 1] = 40 * i
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
            for packet in st.encode(frame):
                box.mux(packet)
        for packet in st.encode(None):
            box.mux(packet)
    return path


def _rgb_frames(path: Path) -> list[np.ndarray]:
    """Frames as an outside decoder shows them: FFmpeg (PyAV) converting to rgb24."""
    import av

    with av.open(str(path)) as box:
        return [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]


def test_paper_mode_keeps_the_colours_for_an_outside_decoder(tmp_path: Path, keypair) -> None:
    src = _mjpeg(tmp_path / "in.avi")
    enc, out = tmp_path / "in.vcr", tmp_path / "out.avi"
    api.encrypt(src, enc, keypair[1], mode="paper", seed=77)
    api.decrypt(enc, out, keypair[0])
    want, got = _rgb_frames(src), _rgb_frames(out)
    assert len(got) == len(want) == 4
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a, b)
    assert int(got[0][:, :16, 0].mean()) > 150 and int(got[0][:, 16:, 2].mean()) > 150  # red, blue
    from vidcrypt.analyze import recovered_fraction

    assert recovered_fraction(src, out) == 1.0  # scored in the original's channel order
