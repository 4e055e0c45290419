"""AVI reading and writing with PyAV (bundled FFmpeg libraries; no system ffmpeg needed).

Video frames are handled as numpy arrays in their native 8-bit pixel format when it is one of
:data:`NATIVE_FORMATS` (so a round trip is bit-exact); other formats are converted to rgb24.
Audio is handled as interleaved signed 16-bit PCM, shape ``(samples, channels)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import av
import numpy as np

from .errors import UnsupportedFileError

__all__ = [
    "NATIVE_FORMATS",
    "MediaInfo",
    "probe",
    "iter_streams",
    "AviWriter",
    "make_test_video",
]

NATIVE_FORMATS = ("gray", "yuv420p", "yuv444p", "rgb24", "bgr24")
_FFV1_FORMATS = ("gray", "yuv420p", "yuv444p")


@dataclass(frozen=True)
class MediaInfo:
    """What vidcrypt needs to know about an input AVI.

    Attributes:
        width: Frame width in pixels.
        height: Frame height in pixels.
        pix_fmt: Pixel format the frames are processed in.
        fps: Frame rate.
        audio_rate: Audio sample rate, 0 when there is no audio stream.
        channels: Audio channel count, 0 when there is no audio stream.
    """

    width: int
    height: int
    pix_fmt: str
    fps: Fraction
    audio_rate: int
    channels: int

    @property
    def has_audio(self) -> bool:
        """Whether the file has an audio stream."""
        return self.channels > 0


def probe(path: str | Path) -> MediaInfo:
    """Open ``path`` and describe its first video and audio streams.

    Raises:
        UnsupportedFileError: not readable by FFmpeg, not an AVI, or no video stream.
    """
    try:
        with av.open(str(path)) as box:
            if "avi" not in box.format.name:
                raise UnsupportedFileError(
                    f"{path}: container is {box.format.name!r}, vidcrypt reads AVI files only"
                )
            if not box.streams.video:
                raise UnsupportedFileError(f"{path}: AVI has no video stream")
            vs = box.streams.video[0]
            pix = vs.codec_context.pix_fmt or "rgb24"
            fps = Fraction(vs.average_rate or vs.guessed_rate or 25)
            rate = channels = 0
            if box.streams.audio:
                aus = box.streams.audio[0]
                rate, channels = int(aus.rate), int(aus.codec_context.layout.nb_channels)
            return MediaInfo(
                width=int(vs.width),
                height=int(vs.height),
                pix_fmt=pix if pix in NATIVE_FORMATS else "rgb24",
                fps=fps,
                audio_rate=rate,
                channels=channels,
            )
    except (av.FFmpegError, OSError) as exc:
        raise UnsupportedFileError(f"{path}: not a readable media file ({exc})") from exc


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def iter_streams(path: str | Path, info: MediaInfo) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``("video", frame)`` and ``("audio", samples)`` items in file order.

    Video frames are uint8 arrays in ``info.pix_fmt`` layout; audio is int16
    ``(samples, channels)``. Memory is bounded by one packet's frames.
    """
    with av.open(str(path)) as box:
        streams: list[Any] = [box.streams.video[0]]
        resampler = None
        if info.has_audio:
            streams.append(box.streams.audio[0])
            resampler = av.AudioResampler(
                format="s16", layout=_layout(info.channels), rate=info.audio_rate
            )
        for packet in box.demux(*streams):
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    yield "video", frame.to_ndarray(format=info.pix_fmt)
                elif resampler is not None and isinstance(frame, av.AudioFrame):
                    for out in resampler.resample(frame):
                        yield "audio", out.to_ndarray().reshape(-1, info.channels)
        if resampler is not None:
            for out in resampler.resample(None):
                yield "audio", out.to_ndarray().reshape(-1, info.channels)


class AviWriter(contextlib.AbstractContextManager["AviWriter"]):
    """Write video frames (lossless FFV1, or rawvideo) and s16 PCM audio into an AVI.

    Args:
        path: Output file (written as AVI whatever its suffix).
        info: Stream parameters (size, pixel format, frame rate, audio rate/channels).
        codec: ``"ffv1"`` (default; used when it supports ``info.pix_fmt``) or ``"rawvideo"``.
    """

    def __init__(self, path: str | Path, info: MediaInfo, codec: str = "ffv1") -> None:
        self.info = info
        self.box = av.open(str(path), mode="w", format="avi")
        if codec == "ffv1" and info.pix_fmt not in _FFV1_FORMATS:
            codec = "rawvideo"
        # raw 24-bit video in AVI is BGR (a DIB): every reader takes those bytes as bgr24, so
        # rgb24 frames are stored with their channels reversed, as bgr24
        self._flip = codec == "rawvideo" and info.pix_fmt == "rgb24"
        self._format = "bgr24" if self._flip else info.pix_fmt
        self.video: Any = cast(Any, self.box.add_stream(codec, rate=info.fps))
        self.video.width, self.video.height = info.width, info.height
        self.video.pix_fmt = self._format
        self.audio: Any = None
        if info.has_audio:
            self.audio = self.box.add_stream(
                "pcm_s16le", rate=info.audio_rate, layout=_layout(info.channels)
            )
        self._samples = 0
        self._frames = 0

    def write_video(self, frame: np.ndarray) -> None:
        """Encode one uint8 frame laid out as ``info.pix_fmt``."""
        if self._flip:
            frame = np.ascontiguousarray(frame[..., ::-1])
        vf = av.VideoFrame.from_ndarray(frame, format=self._format)
        vf.pts = self._frames
        vf.time_base = Fraction(1) / self.info.fps
        self._frames += 1
        self.box.mux(self.video.encode(vf))

    def write_audio(self, samples: np.ndarray) -> None:
        """Encode int16 audio of shape ``(samples, channels)``."""
        if self.audio is None:
            raise UnsupportedFileError("audio given but the output has no audio stream")
        data = np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1)
        af = av.AudioFrame.from_ndarray(data, format="s16", layout=_layout(self.info.channels))
        af.sample_rate = self.info.audio_rate
        af.pts = self._samples
        af.time_base = Fraction(1, self.info.audio_rate)
        self._samples += samples.shape[0]
        self.box.mux(self.audio.encode(af))

    def close(self) -> None:
        """Flush the encoders and close the file."""
        self.box.mux(self.video.encode(None))
        if self.audio is not None:
            self.box.mux(self.audio.encode(None))
        self.box.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.box.close()


def make_test_video(
    path: str | Path,
    width: int = 320,
    height: int = 240,
    seconds: float = 5.0,
    fps: int = 25,
    audio_rate: int = 44100,
    channels: int = 2,
    pix_fmt: str = "bgr24",
    codec: str = "rawvideo",
    seed: int = 0,
) -> Path:
    """Write a synthetic AVI: moving gradients and shapes, plus a tone-and-noise soundtrack.

    The picture is smooth (strongly correlated neighbouring pixels, like natural video) so the
    analysis can show what encryption does to correlation and histograms.
    """
    rng = np.random.default_rng(seed)
    n_frames = max(1, round(seconds * fps))
    info = MediaInfo(width, height, pix_fmt, Fraction(fps), audio_rate, channels)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    per_frame = audio_rate // fps if channels else 0
    with AviWriter(path, info, codec=codec) as out:
        for i in range(n_frames):
            r = (xx * 255 / max(width - 1, 1) + 3 * i) % 256
            g = (yy * 255 / max(height - 1, 1) + 2 * i) % 256
            cx, cy = (width / 2) + width / 4 * np.cos(i / 10), height / 2
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(width, height) / 5) ** 2
            b = np.where(disc, 230.0, 40.0 + 20 * np.sin(xx / 7 + i / 5))
            rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 2.0, (height, width, 3))
            frame: np.ndarray = np.clip(rgb, 0, 255).astype(np.uint8)
            if pix_fmt == "bgr24":
                frame = frame[..., ::-1]
            elif pix_fmt != "rgb24":
                frame = av.VideoFrame.from_ndarray(frame, format="rgb24").to_ndarray(format=pix_fmt)
            out.write_video(np.ascontiguousarray(frame))
            if per_frame:
                t = (np.arange(per_frame) + i * per_frame) / audio_rate
                tone = 8000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 300, per_frame)
                pcm = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1)
                out.write_audio(np.clip(pcm, -32768, 32767).astype(np.int16))
    return Path(path)
