"""What a task reads, made ready on its renderer: input files fetched once per node (by content
hash, ``inputs.InputCache``), other tasks' outputs read back from the job's output, decoded and
fitted to the clip's size; a sequence's film stitched (``sequence/stitch.py``).

Every input read is reported with the sha256 of the bytes read: the attempt's ``inputs`` column.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.config import SEQUENCE_OVERLAP_FRAMES
from farm.storage import Sink, StorageOptions
from farm.task import InputRef, InputRole, Mode, Task

if TYPE_CHECKING:
    import numpy as np

    from farm.inputs import InputCache


class InputReadError(RuntimeError):
    """An input could not be read, or is not the file the job was planned with."""


@dataclass
class Prepared:
    """A task's inputs as its pipeline takes them."""

    kwargs: dict[str, Any] = field(default_factory=dict)  # image=, last_image=, video=
    read: tuple[InputRef, ...] = ()  # as read: URI and the sha256 of the bytes
    before: np.ndarray | None = None  # the clip this one continues (a chained segment): its seam


@dataclass(frozen=True)
class Film:
    frames: np.ndarray
    seams: tuple[float, ...]
    read: tuple[InputRef, ...]


class TaskInputs:
    """One per renderer; the cache is the node's (shared by every renderer process on it)."""

    def __init__(self, cache: InputCache | None = None) -> None:
        self._cache = cache

    @property
    def cache(self) -> InputCache:
        if self._cache is None:
            from farm.inputs import InputCache

            self._cache = InputCache()
        return self._cache

    def prepare(self, task: Task, sink: Sink, options: StorageOptions) -> Prepared:
        fit = task.conditioning.fit
        prepared = Prepared()
        if not task.inputs:  # text-to-video: nothing to fetch, no temporary folder per clip
            return prepared
        read = []
        with tempfile.TemporaryDirectory(prefix="farm-inputs-") as tmp:
            for ref in task.inputs:
                path, actual = self._local(ref, sink, options, Path(tmp))
                read.append(actual)
                prepared.kwargs[ref.role.value], before = self._decoded(task, ref, path, fit)
                if before is not None:
                    prepared.before = before
        prepared.read = tuple(read)
        if task.mode is Mode.EXTEND:  # extend continues from the last frame: an image to the pipeline
            prepared.kwargs["image"] = prepared.kwargs.pop("video")
        return prepared

    def _local(self, ref: InputRef, sink: Sink, options: StorageOptions, tmp: Path) -> tuple[Path, InputRef]:
        """The input as a local file, and what was read."""
        from farm.inputs import InputProblem

        parent = ref.task_id
        if parent is None:
            try:
                return self.cache.fetch(ref.uri, ref.sha256, options), ref
            except InputProblem as exc:
                raise InputReadError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None
        local = tmp / f"{parent}.mp4"
        try:
            stored = sink.get_file(f"{parent}.mp4", local)
        except Exception as exc:  # a parent's clip gone between its success and now
            raise InputReadError(f"cannot read the output of {parent}, which this task continues: {exc}") from None
        return local, InputRef(ref.role, stored.uri, stored.sha256)

    def _decoded(self, task: Task, ref: InputRef, path: Path, fit: Any) -> tuple[Any, np.ndarray | None]:
        """The pipeline's argument for one input, and the clip before it when the task continues one."""
        from PIL import Image

        from farm.inputs import fit_frames, load_image, load_video
        from farm.video import decode_frames

        s = task.settings
        if ref.task_id is None and ref.role is not InputRole.VIDEO:
            return load_image(path, s.width, s.height, fit), None
        if task.mode is Mode.V2V:
            return load_video(path, s.width, s.height, s.frames, fit), None
        # A keyframe still (its one frame) or the clip a segment continues (its last frame).
        last = decode_frames(path, last=1) if ref.role is InputRole.VIDEO else decode_frames(path, limit=1)
        fitted = fit_frames(last, s.width, s.height, fit)
        before = None
        if task.mode is Mode.EXTEND and ref.task_id is not None:
            before = decode_frames(path)  # the whole clip before the cut, for the seam score
        return Image.fromarray(fitted[0]), before

    def stitch(self, task: Task, sink: Sink) -> Film:
        """A film from its segments' clips, as its stitching says."""
        from farm.sequence.stitch import stitch
        from farm.video import decode_frames

        assert task.stitching is not None, "a stitch task carries its stitching"
        segments, read = [], []
        with tempfile.TemporaryDirectory(prefix="farm-stitch-") as tmp:
            for ref in task.inputs:
                path, actual = self._local(ref, sink, StorageOptions(), Path(tmp))
                segments.append(decode_frames(path))
                read.append(actual)
        stitched = stitch(segments, task.stitching.crossfade, task.stitching.color_match, SEQUENCE_OVERLAP_FRAMES)
        return Film(stitched.frames, tuple(stitched.seams), tuple(read))


def seam_of(before: np.ndarray | None, frames: np.ndarray) -> float | None:
    """A chained segment's seam score against the clip it continues (its overlap trimmed)."""
    if before is None:
        return None
    from farm.sequence.stitch import seam_score

    return seam_score(before, frames[SEQUENCE_OVERLAP_FRAMES:])
