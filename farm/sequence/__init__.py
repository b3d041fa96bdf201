"""Sequences of shots: their segments stitched into one film (trimmed, colour-matched, crossfaded)."""

from farm.sequence.stitch import (
    Stitched,
    film_length,
    match_colors,
    seam_between_files,
    seam_score,
    stitch,
    stitch_files,
)

__all__ = [
    "Stitched",
    "film_length",
    "match_colors",
    "seam_between_files",
    "seam_score",
    "stitch",
    "stitch_files",
]
