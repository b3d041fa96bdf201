"""The renderer: holds one resident diffusers pipeline and turns tasks into stored clips.

A plain class, made a Ray actor at run time by ``cluster.start_renderers`` (as Ray's own
ActorPool workers are), so it is tested without Ray too. The model is loaded once, in the
constructor; every ``render`` call reuses it.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from farm import faults
from farm.errors import FarmError
from farm.metrics import RendererMetrics
from farm.models import load_pipeline
from farm.storage import OutputTarget, Sink, open_sink
from farm.task import AttemptStatus, FailureKind, ModelKind, ModelRef, Result, Task, Timings
from farm.video import encode_mp4, write_poster

# Pipelines loaded in this process: a renderer loads exactly one, whatever it renders.
_PIPELINE_LOADS = 0


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


class Renderer:
    def __init__(
        self,
        model: ModelRef,
        device: str | None = None,
        threads: int | None = None,
        pool: str = "",
    ) -> None:
        global _PIPELINE_LOADS
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
        self.pipeline: Any = None
        self.load_error = ""
        started = time.perf_counter()
        try:
            self.pipeline = load_pipeline(model, self.device)
            _PIPELINE_LOADS += 1
        except Exception as exc:  # reported through info(), so the driver can say why in one line
            self.load_error = str(exc) if isinstance(exc, FarmError) else _one_line(exc)
        self.load_seconds = time.perf_counter() - started
        self.metrics = RendererMetrics(pool, model.spec)
        if self.pipeline is not None:
            self.metrics.model_loaded(self.load_seconds)

    def info(self) -> RendererInfo:
        return RendererInfo(
            self.actor_id,
            self.node_id,
            self.device,
            self.model.identity,
            self.load_seconds,
            _PIPELINE_LOADS,
            os.getpid(),
            self.load_error,
        )

    def render(self, task: Task, attempt: int, output: OutputTarget) -> Result:
        """Render one attempt. Never raises for a task's own failure: the error goes in the Result."""
        started = time.time()
        base: dict[str, Any] = {
            "task_id": task.task_id,
            "attempt": attempt,
            "node_id": self.node_id,
            "actor_id": self.actor_id,
            "started_at": started,
        }
        stage = FailureKind.RENDER  # which stage a failure belongs to
        try:
            if self.pipeline is None:
                raise RuntimeError(f"model not loaded: {self.load_error}")
            if task.model.identity != self.model.identity:
                raise ValueError(f"task wants model {task.model.spec}, this renderer holds {self.model.spec}")
            faults.inject(task, attempt)  # test-only; nothing unless FARM_TEST_FAULTS is set
            t0 = time.perf_counter()
            frames = self._generate(task)
            t1 = time.perf_counter()
            stage = FailureKind.STORAGE
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
                timings=Timings(self.load_seconds, t1 - t0, t2 - t1, t3 - t2),
                finished_at=time.time(),
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
            return Result(
                **base, status=AttemptStatus.FAILED, error=_one_line(exc), finished_at=time.time(), error_kind=stage
            )

    def _sink(self, output: OutputTarget) -> Sink:
        if output not in self._sinks:
            self._sinks[output] = open_sink(output)
        return self._sinks[output]

    def _generate(self, task: Task):
        s = task.settings
        if task.model.kind is ModelKind.FAKE:
            return self.pipeline(num_frames=s.frames, height=s.height, width=s.width).frames[0]
        import torch

        generator = torch.Generator(device="cpu").manual_seed(task.seed)
        with torch.inference_mode():
            output = self.pipeline(
                prompt=task.prompt,
                negative_prompt=s.negative_prompt or None,
                height=s.height,
                width=s.width,
                num_frames=s.frames,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                generator=generator,
                output_type="np",
            )
        frames = output.frames[0]
        if hasattr(frames, "cpu"):
            frames = frames.float().cpu().numpy()
        return frames


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
    return Result(**fields)
