"""Segments of a sequence → one film: trim the overlap, match colours, crossfade, score the seams.

A sequence is rendered as segments. Segment k ≥ 1 begins with ``overlap`` frames that repeat (a
keyframe plan: the shared keyframe image) or continue (a chained plan: conditioned on it) the end
of segment k − 1; they are trimmed here. Long chains drift in colour, so each segment can be
colour-matched to its (already matched) predecessor, which anchors the whole film to the first
segment's colours. Pure numpy on (T, H, W, 3) uint8 RGB; files go through ``farm.video``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farm.config import SEQUENCE_OVERLAP_FRAMES
from farm.video import decode_frames, encode_mp4

# Frames each side of a cut that a seam score looks at (the local motion is what a cut should
# match, not a whole segment's): stitch() and seam_between_files() use the same window, so the
# scores they report for the same cut agree.
SEAM_WINDOW = 8
# Floor of a seam score's denominator, in 0–255 levels: a still shot's frame steps are ~0 (codec
# noise aside), and a cut into it is judged against half a level rather than divided by ~0.
STEP_FLOOR = 0.5
# A channel whose std over the matching window is below this (levels) is flat (a blank or fading
# frame): its contrast cannot be measured, so only its mean is moved (gain 1).
STD_FLOOR = 1.0
# Gains outside this range are clamped: drift between neighbouring segments is a mild gain, and a
# near-flat window on either side must not flatten, or blow up the noise of, a whole segment.
GAIN_RANGE = (0.5, 2.0)


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Stitched:
    """The film: ``frames`` (T, H, W, 3) uint8; ``seams``, one seam_score per cut, measured after
    colour matching and before crossfade blending; ``cut_at``, the film frame index at which each
    segment after the first begins (its first crossfade frame, if any)."""

    frames: np.ndarray
    seams: tuple[float, ...]
    cut_at: tuple[int, ...]


def film_length(frames: Sequence[int], crossfade: int, overlap: int = SEQUENCE_OVERLAP_FRAMES) -> int:
    """Frames of the film stitched from segments of these lengths: each cut trims ``overlap``
    frames and lays ``crossfade`` frames over the predecessor's last ones."""
    if crossfade < 0 or overlap < 0:
        raise ValueError(f"crossfade and overlap must be 0 or more frames, got {crossfade} and {overlap}")
    if not frames:
        return 0
    return sum(frames) - (len(frames) - 1) * (overlap + crossfade)


def _check_frames(frames: np.ndarray, name: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"{name} must be (T, H, W, 3) RGB frames, got {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (farm.video.to_uint8 converts floats), got {frames.dtype}")
    if len(frames) == 0:
        raise ValueError(f"{name} has no frames")


def _channel_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = frames.reshape(-1, 3).astype(np.float64)
    return flat.mean(axis=0), flat.std(axis=0)


def match_colors(segment: np.ndarray, reference: np.ndarray, window: int = 4) -> np.ndarray:
    """``segment`` with each RGB channel's mean and std over its first ``window`` frames moved to
    those of ``reference``'s last ``window`` frames (Reinhard-style transfer), the same affine map
    applied to every frame; uint8, clipped.

    RGB, not Lab: Reinhard used a decorrelated space to transfer the look of one picture onto a
    different one. Here both windows show the same scene a frame apart, and what differs is drift:
    a per-channel gain and offset (white balance, exposure), which a per-channel affine map in RGB
    undoes exactly, with one clip and no sRGB↔Lab round trip (nonlinear, lossy in uint8, and it
    cannot be done as the 256-entry lookup table per channel used here, cheap on long segments).

    Flat channels (std < STD_FLOOR on either side) keep gain 1 and only move their mean; gains
    are clamped to GAIN_RANGE."""
    _check_frames(segment, "segment")
    _check_frames(reference, "reference")
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}")
    seg_mean, seg_std = _channel_stats(segment[:window])
    ref_mean, ref_std = _channel_stats(reference[-window:])
    flat = (seg_std < STD_FLOOR) | (ref_std < STD_FLOOR)
    gain = np.clip(np.where(flat, 1.0, ref_std / np.maximum(seg_std, STD_FLOOR)), *GAIN_RANGE)
    levels = np.arange(256, dtype=np.float64)
    out = np.empty_like(segment)
    for c in range(3):
        lut = np.clip(np.rint((levels - seg_mean[c]) * gain[c] + ref_mean[c]), 0, 255).astype(np.uint8)
        out[..., c] = lut[segment[..., c]]
    return out


def _step(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two frames, in 0–255 levels."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def seam_score(before: np.ndarray, after: np.ndarray) -> float:
    """How visible the cut from ``before`` to ``after`` is: the mean absolute difference between
    before[-1] and after[0], divided by the median difference between consecutive frames inside
    the two segments (all of the frames given; floored at STEP_FLOOR levels).

    ≈ 1: the cut looks like any other frame step (the motion continues); ≫ 1 (say > 3): a visible
    jump (a different pose, scene or colour). A still shot's steps are ~0, so the floor decides
    there: a cut into it scores its difference in half-levels. Segments of one frame each have no
    steps: the floor alone is the denominator."""
    _check_frames(before, "before")
    _check_frames(after, "after")
    if before.shape[1:] != after.shape[1:]:
        raise ValueError(f"before is {before.shape[1:3]} (H, W), after is {after.shape[1:3]}")
    cut = _step(before[-1], after[0])
    steps = [_step(x[i], x[i + 1]) for x in (before, after) for i in range(len(x) - 1)]
    typical = max(float(np.median(steps)), STEP_FLOOR) if steps else STEP_FLOOR
    return cut / typical


def _check_segments(segments: Sequence[np.ndarray], crossfade: int, overlap: int) -> None:
    if crossfade < 0:
        raise ValueError(f"crossfade must be 0 or more frames, got {crossfade}")
    if overlap < 0:
        raise ValueError(f"overlap must be 0 or more frames, got {overlap}")
    if len(segments) == 0:
        raise ValueError("nothing to stitch: no segments")
    for i, segment in enumerate(segments):
        _check_frames(segment, f"segment {i}")
    height, width = segments[0].shape[1:3]
    for i, segment in enumerate(segments[1:], start=1):
        if segment.shape[1:3] != (height, width):
            h, w = segment.shape[1:3]
            raise ValueError(f"segment {i} is {w}x{h}, segment 0 is {width}x{height}: all must be one size")
    if len(segments) > 1 and len(segments[0]) <= crossfade:
        raise ValueError(f"segment 0 has {len(segments[0])} frames: a crossfade of {crossfade} needs more")
    for i, segment in enumerate(segments[1:], start=1):
        if len(segment) <= overlap + crossfade:
            raise ValueError(
                f"segment {i} has {len(segment)} frames: trimming {overlap} overlapping frames and "
                f"crossfading {crossfade} needs more than {overlap + crossfade}"
            )


def _assemble(parts: Sequence[np.ndarray], crossfade: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Parts laid end to end, each one's first ``crossfade`` frames blended linearly over the
    film's last ones (weights 1/(c+1) … c/(c+1) for the incoming part: every one a true blend)."""
    total = sum(len(part) for part in parts) - (len(parts) - 1) * crossfade
    film = np.empty((total, *parts[0].shape[1:]), dtype=np.uint8)
    film[: len(parts[0])] = parts[0]
    end = len(parts[0])
    weights = (np.arange(1, crossfade + 1, dtype=np.float32) / (crossfade + 1)).reshape(-1, 1, 1, 1)
    cut_at = []
    for part in parts[1:]:
        start = end - crossfade
        cut_at.append(start)
        if crossfade:
            blend = film[start:end].astype(np.float32) * (1 - weights) + part[:crossfade] * weights
            film[start:end] = np.rint(blend).astype(np.uint8)
        film[end : start + len(part)] = part[crossfade:]
        end = start + len(part)
    return film, tuple(cut_at)


def stitch(
    segments: Sequence[np.ndarray],
    crossfade: int = 0,
    color_match: bool = True,
    overlap: int = SEQUENCE_OVERLAP_FRAMES,
) -> Stitched:
    """One film from a sequence's segments: trim the first ``overlap`` frames of each segment
    after the first, colour-match each to its already matched predecessor (``color_match``), then
    crossfade ``crossfade`` frames at each cut (0: a straight cut). Raises ValueError on frames
    that are not uint8 RGB of one size, a negative crossfade, or a segment too short for it.

    Seams are scored after colour matching, since matching is part of the repair and the film
    shows matched colours, and before blending: a crossfade spreads any jump over its frames, so
    scored after it every seam would look smooth, by an amount set by ``crossfade`` rather than
    by whether the content continues. Each uses SEAM_WINDOW frames either side of the cut."""
    _check_segments(segments, crossfade, overlap)
    parts = [segments[0]]
    for segment in segments[1:]:
        part = segment[overlap:]
        parts.append(match_colors(part, parts[-1]) if color_match else part)
    seams = tuple(seam_score(a[-SEAM_WINDOW:], b[:SEAM_WINDOW]) for a, b in itertools.pairwise(parts))
    frames, cut_at = _assemble(parts, crossfade)
    return Stitched(frames, seams, cut_at)


def stitch_files(
    paths: Sequence[Path],
    out: Path,
    fps: int,
    crossfade: int,
    color_match: bool,
    overlap: int = SEQUENCE_OVERLAP_FRAMES,
) -> Stitched:
    """Decode each segment file, stitch them (see stitch), and encode the film as an mp4 at
    ``out``. Every segment is decoded whole and held in memory at once."""
    if len(paths) == 0:
        raise ValueError("nothing to stitch: no segment files")
    result = stitch([decode_frames(path) for path in paths], crossfade, color_match, overlap)
    encode_mp4(result.frames, fps, out)
    return result


def seam_between_files(
    before: Path, after: Path, overlap: int = SEQUENCE_OVERLAP_FRAMES, color_match: bool = False
) -> float:
    """seam_score of segment file ``after`` (its first ``overlap`` frames trimmed) against its
    predecessor's clip ``before``, over SEAM_WINDOW frames either side of the cut. Only the frames
    needed are kept; ``before`` is decoded to its end (PyAV cannot jump to a clip's last frames),
    ``after`` only as far as needed. As rendered by default; ``color_match`` matches ``after`` to
    ``before`` first, as stitch() would (against the raw predecessor, not a matched one)."""
    if overlap < 0:
        raise ValueError(f"overlap must be 0 or more frames, got {overlap}")
    tail = decode_frames(before, last=SEAM_WINDOW)
    head = decode_frames(after, limit=overlap + SEAM_WINDOW)[overlap:]
    if len(head) == 0:
        raise ValueError(f"{after} has no frames beyond the {overlap} that overlap {before}")
    if color_match:
        head = match_colors(head, tail)
    return seam_score(tail, head)
