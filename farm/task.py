"""The vocabulary every module shares: tasks, render settings, results, statuses.

Frozen dataclasses so they cross Ray (pickled) cleanly and can be dict keys. This module
imports nothing of the package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum


class AttemptStatus(StrEnum):
    """Outcome of one try of a task on one renderer."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its renderer died or was stopped; the task goes back to the queue
    CANCELLED = "cancelled"  # its job was cancelled while it ran


class TaskStatus(StrEnum):
    """Where a task of a job stands, derived from its attempts in the catalog."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ModelRef:
    """A model as a manifest names it, resolved to where it loads from.

    ``identity`` is what goes into task ids: it changes when the weights' configuration changes,
    not when the model directory moves.
    """

    spec: str
    kind: str  # "builtin" | "local" | "hub"
    location: str
    identity: str
    family: str  # diffusers pipeline class name, e.g. "WanPipeline"


@dataclass(frozen=True)
class RenderSettings:
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    negative_prompt: str = ""


@dataclass(frozen=True)
class Requirements:
    """What a task needs from a renderer's pool. Empty: any pool."""

    min_vram_gb: float = 0.0
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
    mode: str = "t2v"
    source: str = ""  # where in the manifest it came from, for error messages
    needs: Requirements = Requirements()  # routing only: not part of the task id

    @property
    def variant_dict(self) -> dict[str, str]:
        return dict(self.variant)


def compute_task_id(
    model_identity: str, mode: str, prompt: str, settings: RenderSettings, seed: int, inputs: tuple = ()
) -> str:
    """A stable hash of everything that changes the pixels (and the file: fps)."""
    payload = {
        "model": model_identity,
        "mode": mode,
        "prompt": prompt,
        "settings": asdict(settings),
        "seed": seed,
        "inputs": list(inputs),
    }
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
    # Where a failed attempt failed: render | encode | storage (the renderer's stages), timeout,
    # renderer_lost, bad_renderer, other. Bounded, so it can be a metric label.
    error_kind: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status is AttemptStatus.SUCCEEDED
