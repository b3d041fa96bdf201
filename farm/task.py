"""The vocabulary every module shares: tasks, render settings, results, states and kinds.

Frozen dataclasses so they cross Ray (pickled) cleanly and can be dict keys. States and kinds
are ``str`` enums owned here. A dataclass field's metadata (``spec(...)``) carries what the
other layers derive from it: its Arrow column type (``records.py``) and the bounds a manifest
value must keep (``manifest.py``). This module imports only ``config``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from farm.config import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
)


def spec(arrow: str | None = None, **bounds: Any) -> dict[str, Any]:
    """A dataclass field's metadata: its Arrow type (when not plain str/int/float/bool) and the
    pydantic bounds (gt, ge, le, …) a manifest value for it must keep."""
    return {"arrow": arrow, "bounds": bounds}


class AttemptStatus(StrEnum):
    """Outcome of one try of a task on one renderer."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its renderer died or was stopped; the task goes back to the queue
    CANCELLED = "cancelled"  # its job was cancelled while it ran
    # Not a try: a succeeded attempt's output was found missing or changed (its row names the
    # attempt in ``invalidates``); the task is no longer done and is rendered again.
    INVALIDATED = "invalidated"
    # Never attempted: a task it depends on (a sequence's earlier segment, its keyframe) failed for good.
    BLOCKED = "blocked"


class TaskStatus(StrEnum):
    """Where a task of a job stands, derived from its attempts in the catalog."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"  # a task it depends on failed: never attempted


class JobEvent(StrEnum):
    """A job's lifecycle, as events in the catalog (the last one is the job's state)."""

    SUBMITTED = "submitted"  # the client wrote the job and its task list
    ADMITTED = "admitted"  # a controller took it (detail: that controller's Ray session)
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"  # the job could not run at all (e.g. its model did not load)
    INTERRUPTED = "interrupted"  # the embedded farm running it stopped before it ended


class JobState(StrEnum):
    """What a job is doing, as progress reports and `farm status` show it."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    CANCELLING = "cancelling"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def live(self) -> bool:
        return self in (JobState.RUNNING, JobState.CANCELLING)


class FailureKind(StrEnum):
    """Why an attempt failed (the attempt column ``error_kind``; a bounded metric label)."""

    RENDER = "render"  # the pipeline raised
    ENCODE = "encode"  # writing the mp4 or poster failed
    STORAGE = "storage"  # the sink could not store the files
    TIMEOUT = "timeout"  # ran past the job's timeout_s; its renderer was replaced
    RENDERER_LOST = "renderer_lost"  # its renderer (process or node) died under it
    BAD_RENDERER = "bad_renderer"  # the job's renderers kept failing; the scheduler gave up
    MODEL_LOAD = "model_load"  # the renderer could not load the model
    OUTPUT_MISSING = "output_missing"  # a done task's clip is gone from its output: rendered again
    OUTPUT_CHANGED = "output_changed"  # a done task's clip is not the file made (size or checksum): rendered again
    OOM = "oom"  # the accelerator ran out of memory; retried on a pool with more VRAM if there is one
    INPUT = "input"  # an input could not be read, or is not the file the job was planned with
    PARENT_FAILED = "parent_failed"  # blocked: a task it depends on failed
    OTHER = "other"


class ModelKind(StrEnum):
    """Where a model comes from."""

    BUILTIN = "builtin"  # embedded, built offline by farm (tiny configs, seeded weights)
    LOCAL = "local"  # a diffusers directory on disk
    HUB = "hub"  # a Hugging Face hub id, from the local cache
    FAKE = "fake"  # benchmark-only stand-ins (farm/models/fake.py)


class Precision(StrEnum):
    """How a model's weights are held and computed (``render: precision:``; farm/models/variants.py).
    ``auto`` is resolved at plan time to one of the others: a task never runs as ``auto``."""

    BF16 = "bf16"  # every component resident in bf16 (float32 on a CPU, and the record says so)
    BF16_OFFLOAD = "bf16-offload"  # bf16, streamed from CPU memory group by group: same pixels, less VRAM
    INT8 = "int8"  # transformer weights int8 (torchao, weight-only), quantised at load
    Q8 = "q8"  # transformer from a Q8_0 GGUF file
    Q4 = "q4"  # transformer from a Q4_0 GGUF file
    AUTO = "auto"  # the best variant that fits the cheapest pool able to take the task


class CacheMode(StrEnum):
    """diffusers cache hooks that reuse transformer work across denoising steps (``render: cache:``).
    Each changes the pixels, so it is part of the task id; parameters are fixed per mode."""

    NONE = "none"
    FIRST_BLOCK = "first-block"  # FirstBlockCacheConfig(threshold=0.05)
    PAB = "pab"  # PyramidAttentionBroadcastConfig: self-attention reused every 2nd step in t∈(100, 800)
    TAYLORSEER = "taylorseer"  # TaylorSeerCacheConfig defaults


class Mode(StrEnum):
    """What a task generates from (the manifest's ``mode:``; ``stitch`` is planned by farm itself)."""

    T2V = "t2v"  # text to video
    I2V = "i2v"  # a start image (``image:``) to video
    FLF2V = "flf2v"  # first and last image (``image:``, ``last_image:``) to video
    V2V = "v2v"  # a source video (``video:``) restyled, ``strength:`` of the way
    EXTEND = "extend"  # continue a clip from its last frame (a chained sequence's later segments)
    STITCH = "stitch"  # join a sequence's segments into one film (no model)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The conditioning keys this mode reads."""
        return _MODE_INPUTS[self]


_MODE_INPUTS: dict[str, tuple[str, ...]] = {
    "t2v": (),
    "i2v": ("image",),
    "flf2v": ("image", "last_image"),
    "v2v": ("video",),
    "extend": ("video",),
    "stitch": (),
}


class Fit(StrEnum):
    """How an input image or video that doesn't match the clip's size is fitted (``fit:``)."""

    CROP = "crop"  # scaled to cover the frame, centre cropped: no bars, no distortion
    PAD = "pad"  # scaled to fit inside, black bars: nothing of the input cut off
    RESIZE = "resize"  # stretched to the frame: the whole input, distorted if the aspect differs


class InputRole(StrEnum):
    """What an input is to the task that reads it."""

    IMAGE = "image"
    LAST_IMAGE = "last_image"
    VIDEO = "video"
    SEGMENT = "segment"  # a stitched film's segment, in order


class StorageKind(StrEnum):
    """Where outputs (and the catalog) live: the one place that knows what an s3:// URI is."""

    LOCAL = "local"
    S3 = "s3"

    @classmethod
    def of(cls, uri: str) -> StorageKind:
        return cls.S3 if uri.startswith("s3://") else cls.LOCAL


@dataclass(frozen=True)
class ModelRef:
    """A model as a manifest names it, resolved to where it loads from.

    ``identity`` is what goes into task ids: it changes when the weights' configuration changes,
    not when the model directory moves.
    """

    spec: str
    kind: ModelKind
    location: str
    identity: str
    family: str  # diffusers pipeline class name, e.g. "WanPipeline"


@dataclass(frozen=True)
class RenderSettings:
    """Everything besides prompt, seed and model that changes a clip. Declared once: the manifest's
    ``render:`` keys, the task list's and attempt rows' columns and the task id derive from it."""

    width: int = field(default=DEFAULT_WIDTH, metadata=spec("int32", gt=0, le=8192))
    height: int = field(default=DEFAULT_HEIGHT, metadata=spec("int32", gt=0, le=8192))
    frames: int = field(default=DEFAULT_FRAMES, metadata=spec("int32", gt=0, le=10000))
    fps: int = field(default=DEFAULT_FPS, metadata=spec("int32", gt=0, le=240))
    steps: int = field(default=DEFAULT_STEPS, metadata=spec("int32", gt=0, le=1000))
    guidance: float = field(default=DEFAULT_GUIDANCE, metadata=spec(gt=0, le=100, allow_inf_nan=False))
    negative_prompt: str = ""  # may hold {placeholders}, filled per variant
    precision: Precision = Precision.BF16  # resolved per task at plan time when auto
    cache: CacheMode = CacheMode.NONE
    compile: bool = False  # torch.compile the transformer (warmed once per renderer; numerics differ slightly)


@dataclass(frozen=True)
class Conditioning:
    """What a clip is generated from besides its prompt: the manifest's ``mode:``, ``image:``,
    ``last_image:``, ``video:``, ``strength:`` and ``fit:``, settable per campaign, axis value, row
    or task. Inputs are paths (relative to the manifest) or ``s3://`` URIs and may hold
    {placeholders}; a task carries them resolved, with their content hashes, in ``Task.inputs``.
    The paths are not part of the task id, the hashes are."""

    mode: Mode = Mode.T2V
    image: str = ""
    last_image: str = ""
    video: str = ""
    strength: float = field(default=0.7, metadata=spec(gt=0, le=1, allow_inf_nan=False))
    fit: Fit = Fit.CROP


@dataclass(frozen=True)
class InputRef:
    """One input of a task: a file (``uri``, its ``sha256``), or another task's output
    (``uri`` = ``task:<task_id>``; its sha256 is known once that task has run)."""

    role: InputRole
    uri: str
    sha256: str = ""

    @property
    def task_id(self) -> str | None:
        return self.uri[5:] if self.uri.startswith("task:") else None


@dataclass(frozen=True)
class Stitching:
    """How a sequence's segments are joined (the manifest's ``sequence:`` keys)."""

    crossfade: int = field(default=0, metadata=spec("int32", ge=0, le=1000))  # frames blended at each cut
    color_match: bool = True  # each segment's colours matched to its predecessor's (long chains drift)


@dataclass(frozen=True)
class Requirements:
    """What a task needs from a renderer's pool. Empty: any pool. In a manifest every field is
    optional; without ``min_vram_gb`` farm estimates it from the model and the clip's size."""

    min_vram_gb: float = field(default=0.0, metadata=spec(ge=0, le=4096))
    gpu_type: str | None = None
    pool: str | None = None


@dataclass(frozen=True)
class Pool:
    """A group of interchangeable renderer slots, as the cluster's nodes advertise it.
    ``vram_gb`` None means no GPU memory limit applies (CPU renderers)."""

    name: str
    gpu_type: str | None = None
    vram_gb: float | None = None
    cost_per_hour: float = 0.0

    def fits(self, needs: Requirements) -> bool:
        if needs.pool and needs.pool != self.name:
            return False
        if needs.gpu_type and (self.gpu_type or "").lower() != needs.gpu_type.lower():
            return False
        return self.vram_gb is None or needs.min_vram_gb <= self.vram_gb


@dataclass(frozen=True)
class Task:
    """One clip to render. Same pixel-changing inputs give the same ``task_id``."""

    task_id: str
    prompt: str
    seed: int
    model: ModelRef
    settings: RenderSettings
    variant: tuple[tuple[str, str], ...] = ()
    conditioning: Conditioning = Conditioning()
    source: str = ""  # where in the manifest it came from, for error messages
    needs: Requirements = Requirements()  # routing only: not part of the task id
    inputs: tuple[InputRef, ...] = ()  # resolved inputs, in the order the mode reads them
    parents: tuple[str, ...] = ()  # tasks that must succeed first (a sequence's graph)
    stitching: Stitching | None = None  # a stitch task's joins

    @property
    def variant_dict(self) -> dict[str, str]:
        return dict(self.variant)

    @property
    def mode(self) -> Mode:
        return self.conditioning.mode


# Render settings added after task ids were first stored are hashed only when they differ from what
# farm did before them, so a manifest that does not use them keeps its task ids (and its clips).
HASHED_WHEN_NOT = {"precision": Precision.BF16, "cache": CacheMode.NONE, "compile": False}


def compute_task_id(
    model_identity: str,
    mode: str,
    prompt: str,
    settings: RenderSettings,
    seed: int,
    inputs: tuple[str, ...] = (),
    conditioning: dict[str, Any] | None = None,
) -> str:
    """A stable hash of everything that changes the pixels (and the file: fps). ``inputs``: the
    content hashes of input files, or the task ids of the tasks whose outputs it reads (rendering
    is deterministic, so a task id identifies its pixels); ``conditioning``: the other values of
    a non-t2v mode (strength, fit, stitching). Text-to-video tasks hash neither, so their ids are
    what they always were."""
    # vars, not asdict: the settings are flat, and asdict's deep copy was most of expanding a big manifest
    hashed = {k: v for k, v in vars(settings).items() if k not in HASHED_WHEN_NOT or v != HASHED_WHEN_NOT[k]}
    payload = {
        "model": model_identity,
        "mode": mode,
        "prompt": prompt,
        "settings": hashed,
        "seed": seed,
        "inputs": list(inputs),
    }
    if conditioning:
        payload["conditioning"] = conditioning
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class Timings:
    load_s: float = 0.0  # the renderer's one-off model load, repeated on each result for the record
    generate_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0


@dataclass(frozen=True)
class Result:
    """What a renderer reports for one attempt."""

    task_id: str
    attempt: int
    status: AttemptStatus
    output_uri: str = ""
    poster_uri: str = ""
    bytes: int = 0
    sha256: str = ""
    timings: Timings = field(default_factory=Timings)
    node_id: str = ""
    actor_id: str = ""
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    error_kind: FailureKind | None = None  # why a failed attempt failed
    poster_bytes: int = 0
    poster_sha256: str = ""
    run_variant: str = ""  # the variant exactly as run, e.g. "q4 Q4_0-gguf compute=float32 cpu"
    weights_identity: str = ""  # which weights: the model's identity, or the GGUF file's
    inputs: tuple[InputRef, ...] = ()  # the inputs as read: URIs and the sha256 of the bytes read
    seam_score: float | None = None  # a chained segment: its cut against the segment before (sequence/stitch.py)
    seam_scores: tuple[float, ...] = ()  # a stitched film: each cut, as stitched

    @property
    def succeeded(self) -> bool:
        return self.status is AttemptStatus.SUCCEEDED
