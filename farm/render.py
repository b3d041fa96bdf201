"""The renderer: holds one resident diffusers pipeline and turns tasks into stored clips.

A plain class, made a Ray actor at run time by ``cluster.start_renderers`` (as Ray's own
ActorPool workers are), so it is tested without Ray too. The model is loaded once, in the
constructor, into host memory (on a CPU renderer it is then ready as is); each task's variant
(``precision``, ``compile``: farm/models/loading.py) is made ready on the device by the first
task that asks for it and kept for the next ones, its cost counted as load time. A task asking
for another variant frees the one held first: one variant is resident at a time.

Rendering is two stages (farm/pipelining.py): generation holds the accelerator, and encoding,
storing and the commit marker run beside the next clip's generation when the actor takes more
than one call at a time (GPU renderers: ``RENDER_PIPELINE_DEPTH``). An out-of-memory error fails
the attempt as ``oom`` and frees the device's cached memory; the scheduler retries it on a pool
with more VRAM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm import faults
from farm.errors import FarmError
from farm.metrics import RendererMetrics
from farm.models.fake import fake_pipeline
from farm.models.loading import (  # light: torch and diffusers are imported where a variant is loaded
    Loaded,
    compile_transformer,
    free_device_memory,
    load_base,
    prepare,
    release,
    set_cache,
    set_tiling,
)
from farm.pipelining import ClipFlow, Utilisation
from farm.records import inputs_from
from farm.render_inputs import InputReadError, Prepared, TaskInputs, seam_of
from farm.storage import OutputTarget, Sink, open_sink
from farm.task import AttemptStatus, FailureKind, InputRef, Mode, ModelKind, ModelRef, Precision, Result, Task, Timings
from farm.video import encode_mp4, to_uint8, write_poster

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class RendererInfo:
    actor_id: str
    node_id: str
    device: str
    model_identity: str
    load_seconds: float
    pipeline_loads: int
    pid: int
    load_error: str = ""  # why the model did not load; the renderer is then useless


def _ray_ids() -> tuple[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return ctx.get_actor_id() or "", ctx.get_node_id() or ""
    except ImportError:
        pass
    return "", ""


@dataclass(frozen=True)
class _Clip:
    """A generated clip on its way to the finishing stage."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    generate_s: float
    run_variant: str  # read when it was generated: the next clip may change what the renderer holds
    weights_identity: str
    inputs: tuple[InputRef, ...] = ()  # as read
    seam_score: float | None = None
    seam_scores: tuple[float, ...] = ()


class _VariantLoadError(RuntimeError):
    """The task's variant could not be made ready (e.g. its quantisation library is missing)."""


class Renderer:
    def __init__(
        self,
        model: ModelRef,
        device: str | None = None,
        threads: int | None = None,
        pool: str = "",
        compile_backend: str = "inductor",
    ) -> None:
        if model.kind is ModelKind.FAKE:
            self.device = "cpu"
        else:
            import torch

            if threads:
                torch.set_num_threads(threads)
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model
        self.actor_id, self.node_id = _ray_ids()
        self._sinks: dict[OutputTarget, Sink] = {}
        self.compile_backend = compile_backend
        self.flow = ClipFlow()
        self.task_inputs = TaskInputs()
        self._modes: Any = None  # the pipeline of each mode, made on first use (models/modes.py)
        self._base: Any = None  # the model as loaded into host memory, until a variant takes it
        self._loaded: Loaded | None = None  # the variant held, ready on the device
        self.load_error = ""
        # Pipelines this renderer loaded: one, whatever it renders, and again only when a task asks
        # for another variant than the one it holds (a Ray actor is a process: its loads are these).
        self.pipeline_loads = 0
        started = time.perf_counter()
        try:
            if model.kind is ModelKind.FAKE:
                self._loaded = Loaded(
                    fake_pipeline(model.spec), Precision.BF16, "cpu", "float32", model.identity, "fake"
                )
            else:
                self._base = load_base(model, self.device)
                if not self.device.startswith("cuda"):  # nothing to move: bf16 (as float32) is ready now
                    self._load_variant(Precision.BF16)
            self.pipeline_loads += 1
        except Exception as exc:  # reported through info(), so the driver can say why in one line
            self.load_error = str(exc) if isinstance(exc, FarmError) else _one_line(exc)
        self.load_seconds = time.perf_counter() - started
        self.metrics = RendererMetrics(pool, model.spec)
        if not self.load_error:
            self.metrics.model_loaded(self.load_seconds)

    def info(self) -> RendererInfo:
        return RendererInfo(
            self.actor_id,
            self.node_id,
            self.device,
            self.model.identity,
            self.load_seconds,
            self.pipeline_loads,
            os.getpid(),
            self.load_error,
        )

    def render(self, task: Task, attempt: int, output: OutputTarget) -> Result:
        """Render one attempt. Never raises for a task's own failure: the error goes in the Result.
        Generating holds the accelerator; finishing waits for this clip's turn (see the module)."""
        with self.flow.in_hand():
            started = time.time()
            try:
                with self.flow.generating() as ticket:
                    clip = self._generate_stage(task, attempt, output)
            except Exception as exc:  # a task's failure is data for the catalog, not a crash of the renderer
                return self._generation_failed(task, attempt, started, exc)
            with self.flow.finishing(ticket):
                return self._finish(task, attempt, output, started, clip)

    def render_batch(self, attempts: list[tuple[Task, int]], output: OutputTarget) -> list[Result]:
        """Render several attempts, in order, in one call (short clips: farm/scheduler.py batches
        them so a Ray call per clip does not cost more than the clip). Each is committed as it
        finishes, so a renderer that dies mid-batch leaves the finished ones adoptable. Two batches
        in flight on a pipelined renderer interleave through the same stages as single calls."""
        return [self.render(task, attempt, output) for task, attempt in attempts]

    def utilisation(self) -> Utilisation:
        """Time generating, busy wall time and clips so far: the generate share."""
        return self.flow.utilisation()

    def _fields(self, task: Task, attempt: int, started: float, variant: tuple[str, str]) -> dict[str, Any]:
        """What every Result of this attempt carries."""
        return {
            "task_id": task.task_id,
            "attempt": attempt,
            "node_id": self.node_id,
            "actor_id": self.actor_id,
            "started_at": started,
            "run_variant": variant[0],
            "weights_identity": variant[1],
        }

    def _generate_stage(self, task: Task, attempt: int, output: OutputTarget) -> _Clip:
        """The first stage, holding the accelerator: the task's inputs read, its variant made ready,
        then its frames (a film: its segments stitched; no model)."""
        if task.model.identity != self.model.identity:
            raise ValueError(f"task wants model {task.model.spec}, this renderer holds {self.model.spec}")
        if task.mode is Mode.STITCH:
            faults.inject(task, attempt)
            t0 = time.perf_counter()
            film = self.task_inputs.stitch(task, self._sink(output))
            return _Clip(film.frames, time.perf_counter() - t0, "stitch", "", film.read, None, film.seams)
        if self.load_error:
            raise RuntimeError(f"model not loaded: {self.load_error}")
        prepared = self.task_inputs.prepare(task, self._sink(output), output.options)
        loaded = self._ready_for(task)
        faults.inject(task, attempt)  # test-only; nothing unless FARM_TEST_FAULTS is set
        t0 = time.perf_counter()
        frames = to_uint8(self._generate(task, loaded, prepared))
        generate_s = time.perf_counter() - t0
        self.flow.generated(generate_s)
        seam = seam_of(prepared.before, frames)
        return _Clip(frames, generate_s, loaded.run_variant, loaded.weights_identity, prepared.read, seam)

    def _generation_failed(self, task: Task, attempt: int, started: float, exc: Exception) -> Result:
        kind = FailureKind.MODEL_LOAD if isinstance(exc, _VariantLoadError) else FailureKind.RENDER
        kind = FailureKind.INPUT if isinstance(exc, InputReadError) else kind
        if _is_oom(exc):
            kind = FailureKind.OOM
            _free_device_memory()  # what the failed clip held; the variant's weights stay for the next task
        return Result(
            **self._fields(task, attempt, started, _variant_of(self._loaded)),
            status=AttemptStatus.FAILED,
            error=str(exc) if isinstance(exc, _VariantLoadError | InputReadError) else _one_line(exc),
            finished_at=time.time(),
            error_kind=kind,
        )

    def _finish(self, task: Task, attempt: int, output: OutputTarget, started: float, clip: _Clip) -> Result:
        """The second stage: encode the clip, store it and its poster, then the commit marker."""
        base = self._fields(task, attempt, started, (clip.run_variant, clip.weights_identity))
        frames = clip.frames
        t1 = time.perf_counter()
        t0 = t1 - clip.generate_s  # t1 - t0: the generation alone, not the wait for this turn
        try:
            stage = FailureKind.STORAGE  # which stage a failure belongs to
            sink = self._sink(output)
            with tempfile.TemporaryDirectory(prefix="farm-render-") as tmp:
                video_path, poster_path = Path(tmp) / "clip.mp4", Path(tmp) / "poster.jpg"
                stage = FailureKind.ENCODE
                encode_mp4(frames, task.settings.fps, video_path)
                write_poster(frames, poster_path)
                t2 = time.perf_counter()
                stage = FailureKind.STORAGE
                video = sink.put_file(video_path, f"{task.task_id}.mp4")
                poster = sink.put_file(poster_path, f"{task.task_id}.jpg")
            t3 = time.perf_counter()
            result = Result(
                **base,
                status=AttemptStatus.SUCCEEDED,
                output_uri=video.uri,
                poster_uri=poster.uri,
                bytes=video.bytes,
                sha256=video.sha256,
                poster_bytes=poster.bytes,
                poster_sha256=poster.sha256,
                timings=Timings(self.load_seconds, t1 - t0, t2 - t1, t3 - t2),
                finished_at=time.time(),
                inputs=clip.inputs,
                seam_score=clip.seam_score,
                seam_scores=clip.seam_scores,
            )
            sink.put_json(result_record(result), f"{task.task_id}.json")  # the commit marker, last
            # The marker is part of writing the clip: count it (the marker itself can't hold its own time).
            result = replace(result, timings=replace(result.timings, write_s=time.perf_counter() - t2))
            self.metrics.clip_made(
                result.timings.generate_s,
                result.timings.encode_s,
                result.timings.write_s,
                len(frames),
                task.settings.fps,
            )
            return result
        except Exception as exc:  # a task's failure is data for the catalog, not a crash of the renderer
            if _disk_full(exc):  # wherever it struck (temp folder or sink), a full disk is a storage failure
                stage = FailureKind.STORAGE
                self._discard(output, task.task_id)
            return Result(
                **base, status=AttemptStatus.FAILED, error=_one_line(exc), finished_at=time.time(), error_kind=stage
            )

    def _discard(self, output: OutputTarget, task_id: str) -> None:
        """Remove what this attempt stored before the disk filled up: a clip without its marker is
        not committed, and its bytes are what the next attempt needs."""
        with contextlib.suppress(Exception):  # best effort: the attempt has failed already
            self._sink(output).discard({f"{task_id}.mp4", f"{task_id}.jpg"})

    def _sink(self, output: OutputTarget) -> Sink:
        if output not in self._sinks:
            self._sinks[output] = open_sink(output)
        return self._sinks[output]

    def _ready_for(self, task: Task) -> Loaded:
        """The task's variant (precision, compiled or not) on the device, its cache hooks and VAE
        tiling set. Loading a variant, compiling and warming count as load time."""
        s = task.settings
        loaded = self._loaded
        if task.model.kind is ModelKind.FAKE and loaded is not None:
            return loaded
        if Precision(s.precision) is Precision.AUTO:
            raise ValueError("precision auto is resolved when the job is planned; this task was not planned")
        want = (Precision(s.precision), bool(s.compile))
        if loaded is None or (loaded.precision, bool(loaded.compiled)) != want:
            started = time.perf_counter()
            try:
                loaded = self._load_variant(want[0])
                if want[1]:
                    compile_transformer(loaded, self.compile_backend)
                    self._warm(loaded, s)
            except Exception as exc:
                if _is_oom(exc):
                    raise
                why = str(exc) if isinstance(exc, FarmError) else _one_line(exc)
                raise _VariantLoadError(f"cannot load {task.model.spec} as {want[0]}: {why}") from exc
            self.load_seconds += time.perf_counter() - started  # in every later result's load_s
        set_cache(loaded, s.cache)
        set_tiling(loaded, s)
        return loaded

    def _load_variant(self, precision: Precision) -> Loaded:
        """Free the variant held, then make the model ready as ``precision``."""
        release(self._loaded)
        self._loaded = None
        base, self._base = self._base, None
        if base is None:  # the first variant took the constructor's copy: load the model again
            base = load_base(self.model, self.device)
            self.pipeline_loads += 1
        self._loaded = prepare(self.model, precision, self.device, base)
        return self._loaded

    def _warm(self, loaded: Loaded, s: Any) -> None:
        """One step at the task's size, so compiling happens now and counts as load time."""
        import torch

        with torch.inference_mode():
            loaded.pipeline(
                prompt="warm-up",
                height=s.height,
                width=s.width,
                num_frames=s.frames,
                num_inference_steps=1,
                guidance_scale=s.guidance,
                generator=torch.Generator(device="cpu").manual_seed(0),
                output_type="latent",
            )

    def _generate(self, task: Task, loaded: Loaded, prepared: Prepared) -> Any:
        s = task.settings
        if task.model.kind is ModelKind.FAKE:
            return loaded.pipeline(num_frames=s.frames, height=s.height, width=s.width).frames[0]
        from farm.models.modes import ModePipelines, generate

        if self._modes is None:
            self._modes = ModePipelines(self.model, self.device)
        return generate(
            self._modes.get(task.mode, loaded.pipeline),
            task.mode,
            prompt=task.prompt,
            negative_prompt=s.negative_prompt,
            width=s.width,
            height=s.height,
            frames=s.frames,
            steps=s.steps,
            guidance=s.guidance,
            seed=task.seed,
            strength=task.conditioning.strength,
            **prepared.kwargs,
        )


def _variant_of(loaded: Loaded | None) -> tuple[str, str]:
    return (loaded.run_variant, loaded.weights_identity) if loaded else ("", "")


def _is_oom(exc: BaseException) -> bool:
    """The accelerator ran out of memory: CUDA's OutOfMemoryError, or another backend's message."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    if "torch" in sys.modules:  # a fake renderer never imported it: nothing to free
        free_device_memory()


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _one_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip().replace("\n", " ")[:2000]


def result_record(result: Result) -> dict:
    """A Result as plain JSON (the commit marker's body)."""
    record = asdict(result)
    record["status"] = result.status.value
    return record


def result_from_record(record: dict) -> Result:
    fields = dict(record)
    fields["status"] = AttemptStatus(fields["status"])
    fields["timings"] = Timings(**fields["timings"])
    fields["error_kind"] = FailureKind(fields["error_kind"]) if fields.get("error_kind") else None
    fields["inputs"] = inputs_from(fields.get("inputs"))  # markers older than inputs have none
    fields["seam_scores"] = tuple(fields.get("seam_scores") or ())
    return Result(**fields)
