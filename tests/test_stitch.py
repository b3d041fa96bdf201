"""Stitching a sequence's segments into a film: lengths, overlap trim, colour match, seam scores,
crossfades, bad inputs; one path through real mp4 files (checked with PyAV and, if present, ffprobe)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest

from farm.sequence import film_length, match_colors, seam_between_files, seam_score, stitch, stitch_files
from farm.video import encode_mp4, probe

H, W = 32, 48


def moving(count: int, start: int = 0, period: int = W, vertical: bool = False) -> np.ndarray:
    """A smooth pattern drifting one pixel a frame (frame t shows it shifted by t): every frame
    step is alike, and every frame has the same colour statistics (the shift is cyclic)."""
    t = np.arange(start, start + count, dtype=np.float64)[:, None, None, None]
    y = np.arange(H, dtype=np.float64)[None, :, None, None]
    x = np.arange(W, dtype=np.float64)[None, None, :, None]
    phase = np.array([0.0, 2.0, 4.0])[None, None, None, :]
    along, across = (y, x) if vertical else (x, y)
    wave = np.sin(2 * np.pi * (along - t) / period + phase) * (0.6 + 0.4 * np.cos(2 * np.pi * across / 16))
    return np.rint(128 + 60 * wave).astype(np.uint8)


def other_scene(count: int) -> np.ndarray:
    """Another shot: a different pattern, moving the other way, in other colours."""
    frames = moving(count, period=H, vertical=True).astype(np.int16)
    return np.clip(frames[..., ::-1] * 0.5 + 20, 0, 255).astype(np.uint8)


def drift(frames: np.ndarray, gain: tuple[float, float, float], offset: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(frames * np.array(gain) + np.array(offset)), 0, 255).astype(np.uint8)


def flat(count: int, value: int) -> np.ndarray:
    return np.full((count, H, W, 3), value, np.uint8)


def window_means(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(-1, 3).mean(axis=0)


# ----------------------------------------------------------------------------- lengths, trimming


@pytest.mark.parametrize(
    ("frames", "crossfade", "overlap", "expected"),
    [
        ([10, 10, 10], 0, 1, 28),
        ([10, 10, 10], 2, 1, 24),
        ([10, 12], 3, 0, 19),
        ([7], 4, 1, 7),
        ([], 2, 1, 0),
    ],
)
def test_film_length(frames, crossfade, overlap, expected):
    assert film_length(frames, crossfade, overlap) == expected


@pytest.mark.parametrize("crossfade", [0, 1, 3])
def test_stitched_length_matches_film_length(crossfade):
    segments = [moving(9), moving(10, start=8), moving(12, start=17)]
    film = stitch(segments, crossfade=crossfade)
    assert len(film.frames) == film_length([9, 10, 12], crossfade) == 31 - 2 * crossfade - 2
    assert film.frames.dtype == np.uint8 and film.frames.shape[1:] == (H, W, 3)
    assert len(film.seams) == len(film.cut_at) == 2


def test_overlap_is_trimmed():
    # Frame ids as grey levels: segment 1's first frame is segment 0's last (id 5).
    ids = np.arange(11) * 20
    first = np.stack([flat(1, v)[0] for v in ids[:6]])
    second = np.stack([flat(1, v)[0] for v in ids[5:]])
    film = stitch([first, second], color_match=False)
    assert [int(f[0, 0, 0]) for f in film.frames] == ids.tolist()
    assert not any(np.array_equal(a, b) for a, b in itertools.pairwise(film.frames))
    assert film.cut_at == (6,)
    untrimmed = stitch([first, second], color_match=False, overlap=0)
    assert np.array_equal(untrimmed.frames[5], untrimmed.frames[6])  # what the trim removes


def test_chained_motion_stitches_back_to_the_continuous_shot():
    shot = moving(30)
    film = stitch([shot[:10], shot[9:20], shot[19:]])  # colour matching on: nothing to correct
    assert np.array_equal(film.frames, shot)
    assert film.cut_at == (10, 20)


# ----------------------------------------------------------------------------- colour


def test_color_match_pulls_a_shifted_segment_to_the_reference():
    reference, truth = moving(10), moving(10, start=10)
    shifted = drift(truth, (0.8, 1.15, 0.9), (50.0, -35.0, 30.0))
    assert np.abs(window_means(shifted[:4]) - window_means(reference[-4:])).max() > 10
    matched = match_colors(shifted, reference)
    assert matched.dtype == np.uint8 and matched.shape == shifted.shape
    assert np.abs(window_means(matched[:4]) - window_means(reference[-4:])).max() < 1.0
    stds = [matched[:4, ..., c].std() / reference[-4:, ..., c].std() for c in range(3)]
    assert stds == pytest.approx([1.0] * 3, abs=0.03)
    # The whole segment, not only its window, is mapped back (to within rounding of the drift).
    assert np.abs(matched.astype(int) - truth).max() <= 2


def test_color_match_leaves_a_matching_segment_unchanged():
    # The reference fades in: only its last frames (the window) are what the segment continues.
    fade_in = drift(moving(6), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0))
    reference, segment = np.concatenate([fade_in, moving(4, start=6)]), moving(10, start=10)
    assert np.abs(match_colors(segment, reference).astype(int) - segment).max() <= 1


def test_color_match_of_flat_frames_moves_the_mean_only():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero, no NaN
        flat_to_textured = match_colors(flat(6, 90), moving(6))
        textured_to_flat = match_colors(moving(6), flat(6, 140))
    assert np.abs(window_means(flat_to_textured) - window_means(moving(6))).max() < 1.0
    assert flat_to_textured.std(axis=(0, 1, 2)).max() == 0  # no texture invented
    assert np.abs(window_means(textured_to_flat) - 140).max() < 1.0
    assert textured_to_flat.std() == pytest.approx(moving(6).std(), rel=0.02)  # not flattened


def test_chain_drift_is_anchored_to_the_first_segment():
    shot = moving(40)
    segments = [shot[:10]]
    for k in range(1, 4):  # each segment drifts further: brighter, warmer
        segments.append(drift(shot[10 * k - 1 : 10 * k + 10], (1.0, 1.0, 1.0), (8.0 * k, 3.0 * k, -6.0 * k)))
    matched = stitch(segments).frames
    unmatched = stitch(segments, color_match=False).frames
    assert np.abs(window_means(unmatched[-4:]) - window_means(shot[:4])).max() > 15
    assert np.abs(window_means(matched[-4:]) - window_means(shot[:4])).max() < 1.0


def test_each_segment_is_matched_to_its_matched_predecessor():
    # The light really changes during segment 1 (frames 12–17 brighten by 30 levels); segment 2
    # continues at the new level but drifted: it must be matched to segment 1's end, not to 0.
    shot = moving(30).astype(np.float64)
    shot += 30 * np.clip((np.arange(30) - 12) / 5, 0, 1)[:, None, None, None]
    shot = shot.astype(np.uint8)
    segments = [shot[:10], shot[9:20], drift(shot[19:], (1.0, 1.0, 1.0), (-25.0, 10.0, 20.0))]
    film = stitch(segments)
    # Within 5 levels, not 30: the windows see 3 of the ramp's levels as drift (a known bias).
    assert np.abs(window_means(film.frames[-4:]) - window_means(shot[-4:])).max() < 5
    assert film.seams[1] < 2


# ----------------------------------------------------------------------------- seams


def test_seam_score_is_one_on_continuous_motion_and_large_on_a_new_scene():
    shot = moving(20)
    assert seam_score(shot[:10], shot[10:]) == pytest.approx(1.0, abs=0.1)
    assert seam_score(shot[:10], other_scene(10)) > 5


def test_seam_score_floor_on_still_shots():
    still, brighter = flat(5, 100), flat(5, 105)
    assert seam_score(still, still) == 0.0
    assert seam_score(still, brighter) == pytest.approx(5 / 0.5)  # denominator floored, finite


def test_seams_are_scored_after_colour_matching_and_before_blending():
    shot = moving(20)
    drifted = drift(shot[9:], (1.0, 1.0, 1.0), (40.0, -30.0, 25.0))
    assert stitch([shot[:10], drifted], color_match=False).seams[0] > 5
    assert stitch([shot[:10], drifted]).seams[0] == pytest.approx(1.0, abs=0.2)
    new_scene = [shot[:10], other_scene(10)]
    assert stitch(new_scene, crossfade=4).seams == stitch(new_scene).seams
    assert stitch(new_scene).seams[0] > 5


# ----------------------------------------------------------------------------- crossfade


def test_crossfade_frames_are_linear_blends():
    dark, light = flat(6, 40), flat(7, 200)
    film = stitch([dark, light], crossfade=3, color_match=False)
    levels = [int(f[0, 0, 0]) for f in film.frames]
    # 6 + (7 − 1 overlap) − 3 = 9 frames; the blend weights are 1/4, 2/4, 3/4.
    assert levels == [40, 40, 40, 80, 120, 160, 200, 200, 200]
    assert film.cut_at == (3,)


def test_cut_positions_with_several_crossfades():
    segments = [flat(6, 10), flat(7, 100), flat(8, 200)]
    film = stitch(segments, crossfade=2, color_match=False)
    assert len(film.frames) == film_length([6, 7, 8], 2) == 15
    assert film.cut_at == (4, 8)
    levels = [int(f[0, 0, 0]) for f in film.frames]
    assert all(a < b < c for a, b, c in [(10, levels[4], 100), (10, levels[5], 100), (100, levels[8], 200)])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("segments", "kwargs", "message"),
    [
        ([], {}, "no segments"),
        ([moving(5), np.zeros((5, H, W + 2, 3), np.uint8)], {}, "all must be one size"),
        ([moving(5), moving(5).astype(np.float32)], {}, "uint8"),
        ([moving(5), moving(5)[..., 0]], {}, r"\(T, H, W, 3\)"),
        ([moving(5), moving(3)], {"crossfade": 2}, "needs more than 3"),
        ([moving(5), moving(1)], {}, "needs more than 1"),
        ([moving(2), moving(5)], {"crossfade": 2}, "segment 0 has 2 frames"),
        ([moving(5), moving(5)], {"crossfade": -1}, "crossfade must be 0 or more"),
        ([moving(5), moving(5)], {"overlap": -1}, "overlap must be 0 or more"),
    ],
)
def test_bad_segments_are_refused(segments, kwargs, message):
    with pytest.raises(ValueError, match=message):
        stitch(segments, **kwargs)


def test_shortest_allowed_segment_is_accepted():
    assert len(stitch([moving(5), moving(4)], crossfade=2).frames) == 5 + 4 - 1 - 2


def test_bad_arguments_to_the_measures_are_refused():
    with pytest.raises(ValueError, match="0 or more"):
        film_length([10, 10], -1)
    with pytest.raises(ValueError, match="window"):
        match_colors(moving(5), moving(5), window=0)
    with pytest.raises(ValueError, match="uint8"):
        match_colors(moving(5).astype(np.float64), moving(5))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        seam_score(moving(5), np.zeros((5, H + 2, W, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        seam_score(moving(5)[:0], moving(5))


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def segment_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segments")
    shot = moving(30)
    paths = []
    for i, frames in enumerate([shot[:9], shot[8:18], drift(shot[17:], (1.0, 1.0, 1.0), (30.0, 0.0, -30.0))]):
        paths.append(folder / f"segment{i}.mp4")
        encode_mp4(frames, 12, paths[-1])
    paths.append(folder / "other.mp4")
    encode_mp4(other_scene(10), 12, paths[-1])
    return paths


def ffprobe(path):
    out = subprocess.run(
        [
            *("ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames"),
            *("-show_entries", "stream=nb_read_frames,r_frame_rate,width,height", "-of", "json", str(path)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["streams"][0]


@pytest.mark.parametrize("crossfade", [0, 2, 4])
def test_stitch_files_writes_the_film(segment_files, tmp_path, crossfade):
    out = tmp_path / "film.mp4"
    film = stitch_files(segment_files[:3], out, fps=12, crossfade=crossfade, color_match=True)
    expected = film_length([9, 10, 13], crossfade)
    assert len(film.frames) == expected
    info = probe(out)
    assert (info.frames, info.fps, info.width, info.height) == (expected, 12.0, W, H)
    assert max(film.seams) < 2  # continuous motion, the third segment's drift matched away


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not on PATH (PyAV's check above still runs)")
@pytest.mark.parametrize("crossfade", [0, 3])
def test_stitched_film_as_ffprobe_reads_it(segment_files, tmp_path, crossfade):
    out = tmp_path / "film.mp4"
    stitch_files(segment_files[:3], out, fps=12, crossfade=crossfade, color_match=False)
    expected = film_length([9, 10, 13], crossfade)
    stream = ffprobe(out)
    assert (int(stream["nb_read_frames"]), stream["r_frame_rate"]) == (expected, "12/1")
    assert (stream["width"], stream["height"]) == (W, H)


def test_seam_between_files(segment_files):
    first, second, third, other = segment_files
    assert 0.8 < seam_between_files(first, second) < 1.5  # ~0 if the repeated frame were kept
    assert seam_between_files(second, third) > 3  # the drift, as rendered
    assert seam_between_files(second, third, color_match=True) < 1.5
    assert seam_between_files(first, other, overlap=0) > 5
    with pytest.raises(ValueError, match="no frames beyond"):
        seam_between_files(first, second, overlap=10)
