"""Frames → H.264 mp4 (and a poster image); probing an mp4 back."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    duration_s: float


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output (T, H, W, 3) floats in [0, 1] → uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18) -> None:
    """Write (T, H, W, 3) uint8 frames as H.264/yuv420p mp4 (plays everywhere)."""
    import av

    frames = to_uint8(frames)
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 with yuv420p needs even width and height, got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread: byte-identical output for identical frames, and renderers already use the cores.
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        stream.codec_context.thread_count = 1
        for i in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_poster(frames: np.ndarray, path: Path) -> None:
    """The middle frame as a JPEG, for catalog browsers and review tools."""
    from PIL import Image

    frames = to_uint8(frames)
    Image.fromarray(frames[len(frames) // 2]).save(path, format="JPEG", quality=90)


def probe(path: Path) -> VideoInfo:
    """Decode every frame of an mp4 back: the honest count, size and rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or 0
        time_base = stream.time_base
        duration = float(stream.duration * time_base) if stream.duration and time_base else count / float(rate or 1)
        return VideoInfo(
            count,
            stream.codec_context.width,
            stream.codec_context.height,
            float(rate),
            stream.codec_context.name,
            duration,
        )


def decode_frames(path: Path, limit: int | None = None, last: int | None = None) -> np.ndarray:
    """Decode an mp4 (or any video PyAV reads) to (T, H, W, 3) uint8 RGB: the first ``limit``
    frames, or only the ``last`` n (the whole file is decoded to find them), or all."""
    import collections

    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        kept: collections.deque[np.ndarray] = collections.deque(maxlen=last)
        for frame in container.decode(stream):
            kept.append(frame.to_ndarray(format="rgb24"))
            if limit is not None and len(kept) >= limit:
                break
    if not kept:
        raise ValueError(f"{path} has no video frames")
    return np.stack(list(kept))
