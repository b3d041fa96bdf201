"""H.264 encoding decoded back with PyAV: frame count, size, rate; the poster image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from farm.video import encode_mp4, probe, to_uint8, write_poster


def test_mp4_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.random((13, 48, 80, 3), dtype=np.float32)
    path = tmp_path / "clip.mp4"
    encode_mp4(frames, 12, path)
    info = probe(path)
    assert (info.frames, info.width, info.height, info.fps, info.codec) == (13, 80, 48, 12.0, "h264")
    assert info.duration_s == pytest.approx(13 / 12, abs=0.1)


def test_same_frames_same_bytes(tmp_path):
    frames = np.linspace(0, 1, 5 * 16 * 16 * 3, dtype=np.float32).reshape(5, 16, 16, 3)
    encode_mp4(frames, 8, tmp_path / "a.mp4")
    encode_mp4(frames, 8, tmp_path / "b.mp4")
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_odd_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        encode_mp4(np.zeros((3, 15, 16, 3), np.uint8), 8, tmp_path / "x.mp4")


def test_poster_is_the_middle_frame(tmp_path):
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    frames[2] = 200
    write_poster(frames, tmp_path / "p.jpg")
    image = np.asarray(Image.open(tmp_path / "p.jpg"))
    assert image.shape == (16, 16, 3) and abs(int(image.mean()) - 200) <= 2
    assert to_uint8(np.array([0.0, 1.0, 2.0])).tolist() == [0, 255, 255]
