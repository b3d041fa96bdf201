"""Every metric farm exports, named once, and the two places they come from.

- The controller (one process on the head node) serves its metrics with prometheus-client on
  ``FARM_METRICS_ADDRESS`` (default 127.0.0.1:9400): job and queue state, attempts and failures,
  renderers and pools, cost. State is read at scrape time from a snapshot the controller hands
  over, so a gauge can never drift from what the controller knows.
- Renderers (on every node) record what only they see — render/encode/write seconds, model load
  seconds, frames and video-seconds made — through Ray's own metrics agent (``ray.util.metrics``),
  which every Ray node runs and lists in Ray's Prometheus service-discovery file. Ray's agent puts
  ``ray_`` before these names: ``farm_render_seconds`` is queried as ``ray_farm_render_seconds``.

A farm job is labelled ``job_id``: Prometheus keeps ``job`` for the scrape job. Label sets stay
bounded: job ids (running jobs, and finished ones for ``FINISHED_JOB_TTL_S``),
pools, models, states and failure reasons — never task ids or prompts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from farm.task import AttemptStatus, FailureKind

log = logging.getLogger("farm.metrics")

RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before each application metric

ATTEMPT_STATUSES = tuple(status.value for status in AttemptStatus)
TASK_STATES = ("queued", "running", "succeeded", "failed", "waiting_for_pool")
RENDERER_STATES = ("busy", "idle", "loading")
# Why an attempt failed, as a small fixed set: the error text itself goes to the catalog.
FAILURE_REASONS = tuple(kind.value for kind in FailureKind)
NO_POOL = "none"  # attempts written off by the scheduler without a renderer

_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed by its source (renderer metrics get RAY_PREFIX in Prometheus)
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    source: str  # controller | renderer
    buckets: tuple[float, ...] = ()

    @property
    def query_name(self) -> str:
        """The name to use in PromQL."""
        return RAY_PREFIX + self.name if self.source == "renderer" else self.name


# ---------------------------------------------------------------- controller metrics
JOB_INFO = MetricSpec(
    "farm_job_info",
    "gauge",
    "1 for each job the controller knows, with its campaign, model, priority and state",
    ("job_id", "campaign", "model", "priority", "state"),
    "controller",
)
JOB_TASKS = MetricSpec("farm_job_tasks", "gauge", "Tasks of a job by state", ("job_id", "state"), "controller")
JOB_PROGRESS = MetricSpec(
    "farm_job_progress_ratio", "gauge", "Finished tasks (succeeded or failed) / all tasks", ("job_id",), "controller"
)
JOB_ETA = MetricSpec(
    "farm_job_eta_seconds",
    "gauge",
    "Estimated seconds until the job finishes, at its rate so far",
    ("job_id",),
    "controller",
)
JOB_DEADLINE = MetricSpec(
    "farm_job_deadline_seconds",
    "gauge",
    "Seconds left until the job's deadline (negative once passed); jobs with a deadline only",
    ("job_id",),
    "controller",
)
QUEUE_DEPTH = MetricSpec(
    "farm_queue_depth_tasks",
    "gauge",
    "Tasks waiting for a renderer, per job and priority",
    ("job_id", "priority"),
    "controller",
)
JOB_ATTEMPTS = MetricSpec(
    "farm_job_attempts_total", "counter", "Attempts of a job by outcome", ("job_id", "status"), "controller"
)
ATTEMPTS = MetricSpec(
    "farm_attempts_total", "counter", "Attempts by pool, model and outcome", ("pool", "model", "status"), "controller"
)
FAILURES = MetricSpec(
    "farm_attempt_failures_total",
    "counter",
    "Failed attempts by pool, model and reason",
    ("pool", "model", "reason"),
    "controller",
)
RETRIES = MetricSpec(
    "farm_retries_total", "counter", "Failed attempts that will be retried", ("pool", "model"), "controller"
)
RENDERERS = MetricSpec(
    "farm_renderers",
    "gauge",
    "Renderer actors by pool and state (busy, idle, loading)",
    ("pool", "gpu_type", "state"),
    "controller",
)
POOL_SLOTS = MetricSpec(
    "farm_pool_slots", "gauge", "Renderer slots the pool's alive nodes offer", ("pool", "gpu_type"), "controller"
)
POOL_VRAM = MetricSpec("farm_pool_vram_bytes", "gauge", "GPU memory of each GPU in the pool", ("pool",), "controller")
POOL_COST_RATE = MetricSpec(
    "farm_pool_cost_dollars_per_hour",
    "gauge",
    "Estimated cost of the pool's slots an hour, from its nodes' stated cost per hour",
    ("pool",),
    "controller",
)
POOL_COST = MetricSpec(
    "farm_pool_cost_dollars_total",
    "counter",
    "Estimated dollars the pool's slots have cost since the controller started",
    ("pool",),
    "controller",
)
POOL_NODES = MetricSpec("farm_pool_nodes", "gauge", "Alive nodes offering the pool", ("pool", "gpu_type"), "controller")
POOL_TARGET_NODES = MetricSpec(
    "farm_pool_target_nodes",
    "gauge",
    "Nodes the controller asks Ray's autoscaler for, per pool it can launch",
    ("pool",),
    "controller",
)
MODEL_LOADS = MetricSpec(
    "farm_model_loads_total", "counter", "Models loaded into renderers", ("pool", "model"), "controller"
)

# ---------------------------------------------------------------- renderer metrics (through Ray)
RENDER_SECONDS = MetricSpec(
    "farm_render_seconds",
    "histogram",
    "Seconds the pipeline took to generate a clip",
    ("pool", "model"),
    "renderer",
    _SECONDS_BUCKETS,
)
ENCODE_SECONDS = MetricSpec(
    "farm_encode_seconds",
    "histogram",
    "Seconds to encode a clip and its poster",
    ("pool", "model"),
    "renderer",
    _SECONDS_BUCKETS,
)
WRITE_SECONDS = MetricSpec(
    "farm_write_seconds",
    "histogram",
    "Seconds to store a clip, its poster and marker",
    ("pool", "model"),
    "renderer",
    _SECONDS_BUCKETS,
)
MODEL_LOAD_SECONDS = MetricSpec(
    "farm_model_load_seconds",
    "histogram",
    "Seconds a renderer took to load its model",
    ("pool", "model"),
    "renderer",
    _SECONDS_BUCKETS,
)
FRAMES = MetricSpec("farm_frames_total", "counter", "Frames of finished clips", ("pool", "model"), "renderer")
VIDEO_SECONDS = MetricSpec(
    "farm_video_seconds_total", "counter", "Seconds of video in finished clips", ("pool", "model"), "renderer"
)

ALL_METRICS = (
    JOB_INFO,
    JOB_TASKS,
    JOB_PROGRESS,
    JOB_ETA,
    JOB_DEADLINE,
    QUEUE_DEPTH,
    JOB_ATTEMPTS,
    ATTEMPTS,
    FAILURES,
    RETRIES,
    RENDERERS,
    POOL_SLOTS,
    POOL_NODES,
    POOL_TARGET_NODES,
    POOL_VRAM,
    POOL_COST_RATE,
    POOL_COST,
    MODEL_LOADS,
    RENDER_SECONDS,
    ENCODE_SECONDS,
    WRITE_SECONDS,
    MODEL_LOAD_SECONDS,
    FRAMES,
    VIDEO_SECONDS,
)


# ---------------------------------------------------------------- what the controller hands over
@dataclass(frozen=True)
class JobSnapshot:
    job_id: str
    campaign: str
    model: str
    priority: int
    state: str
    tasks: dict[str, int]  # TASK_STATES → count
    progress: float
    eta_s: float | None
    deadline_s: float | None = None  # seconds left until the job's deadline, if it has one


@dataclass(frozen=True)
class PoolSnapshot:
    pool: str
    gpu_type: str
    vram_gb: float | None
    cost_per_hour: float
    slots: int
    renderers: dict[str, int]  # RENDERER_STATES → count
    nodes: int = 0
    target_nodes: int | None = None  # what the autoscaler was asked for; None: a pool it cannot launch


@dataclass(frozen=True)
class FarmSnapshot:
    jobs: list[JobSnapshot] = field(default_factory=list)
    pools: list[PoolSnapshot] = field(default_factory=list)


class _CostMeter:
    """Integrates each pool's cost rate over time (the rate only changes when nodes come and go)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rates: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.since = clock()

    def totals_now(self, rates: dict[str, float]) -> dict[str, float]:
        now = self.clock()
        hours = (now - self.since) / 3600
        for pool, rate in self.rates.items():
            self.totals[pool] = self.totals.get(pool, 0.0) + rate * hours
        for pool in rates:
            self.totals.setdefault(pool, 0.0)
        self.rates, self.since = dict(rates), now
        return dict(self.totals)


class ControllerMetrics:
    """The controller's metrics: counters it bumps as attempts finish, gauges read from
    ``snapshot()`` at scrape time. Served by ``serve``; ``exposition`` gives the same text."""

    def __init__(self, snapshot: Callable[[], FarmSnapshot], clock: Callable[[], float] = time.monotonic) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self._snapshot = snapshot
        self._cost = _CostMeter(clock)
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)

        def counter(spec: MetricSpec) -> Counter:
            return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

        self.job_attempts = counter(JOB_ATTEMPTS)
        self.attempts = counter(ATTEMPTS)
        self.failures = counter(FAILURES)
        self.retries = counter(RETRIES)
        self.model_loads = counter(MODEL_LOADS)
        self.registry.register(_SnapshotCollector(self))
        self.address: str | None = None
        self._server: Any = None

    def record_attempt(
        self, job_id: str, pool: str, model: str, status: str, failure_reason: str = "", retried: bool = False
    ) -> None:
        pool = pool or NO_POOL
        self.job_attempts.labels(job_id, status).inc()
        self.attempts.labels(pool, model, status).inc()
        if status == "failed":
            self.failures.labels(pool, model, failure_reason if failure_reason in FAILURE_REASONS else "other").inc()
        if retried:
            self.retries.labels(pool, model).inc()

    def record_model_load(self, pool: str, model: str) -> None:
        """A renderer of ``model`` is ready in ``pool``. Its counters start at 0 now: a series that
        first appears already at 8 shows Prometheus no increase, and rate() would miss a burst."""
        self.model_loads.labels(pool, model).inc()
        for status in ATTEMPT_STATUSES:
            self.attempts.labels(pool, model, status)
        for reason in FAILURE_REASONS:
            self.failures.labels(pool, model, reason)
        self.retries.labels(pool, model)

    def job_admitted(self, job_id: str) -> None:
        for status in ATTEMPT_STATUSES:
            self.job_attempts.labels(job_id, status)  # at 0, for the same reason

    def forget_job(self, job_id: str) -> None:
        """Drop a job's own series once it has aged out (keeps the label set bounded)."""
        for status in ATTEMPT_STATUSES:
            with contextlib.suppress(KeyError):
                self.job_attempts.remove(job_id, status)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, address: str) -> str:
        """Serve on HOST:PORT (port 0 takes a free one). Returns the address actually bound."""
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.address = f"{host}:{server.server_port}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _cost_totals(self, rates: dict[str, float]) -> dict[str, float]:
        with self._lock:
            return self._cost.totals_now(rates)


class _SnapshotCollector:
    """Gauges (and the cost counter) built from the controller's state at scrape time."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.metrics._snapshot()

        def gauge(spec: MetricSpec) -> GaugeMetricFamily:
            return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)

        info, tasks, progress, eta, deadline, queue = (
            gauge(s) for s in (JOB_INFO, JOB_TASKS, JOB_PROGRESS, JOB_ETA, JOB_DEADLINE, QUEUE_DEPTH)
        )
        for job in snap.jobs:
            info.add_metric([job.job_id, job.campaign, job.model, str(job.priority), job.state], 1)
            for state in TASK_STATES:
                tasks.add_metric([job.job_id, state], job.tasks.get(state, 0))
            progress.add_metric([job.job_id], job.progress)
            if job.eta_s is not None:
                eta.add_metric([job.job_id], job.eta_s)
            if job.deadline_s is not None:
                deadline.add_metric([job.job_id], job.deadline_s)
            queue.add_metric([job.job_id, str(job.priority)], job.tasks.get("queued", 0))
        yield from (info, tasks, progress, eta, deadline, queue)

        renderers, slots, nodes, target, vram, rate = (
            gauge(s) for s in (RENDERERS, POOL_SLOTS, POOL_NODES, POOL_TARGET_NODES, POOL_VRAM, POOL_COST_RATE)
        )
        rates = {}
        for pool in snap.pools:
            for state in RENDERER_STATES:
                renderers.add_metric([pool.pool, pool.gpu_type or "cpu", state], pool.renderers.get(state, 0))
            slots.add_metric([pool.pool, pool.gpu_type or "cpu"], pool.slots)
            nodes.add_metric([pool.pool, pool.gpu_type or "cpu"], pool.nodes)
            if pool.target_nodes is not None:
                target.add_metric([pool.pool], pool.target_nodes)
            if pool.vram_gb is not None:
                vram.add_metric([pool.pool], pool.vram_gb * 2**30)
            rates[pool.pool] = pool.slots * pool.cost_per_hour
            rate.add_metric([pool.pool], rates[pool.pool])
        cost = CounterMetricFamily(POOL_COST.name, POOL_COST.help, labels=POOL_COST.labels)
        for pool_name, total in sorted(self.metrics._cost_totals(rates).items()):
            cost.add_metric([pool_name], total)
        yield from (renderers, slots, nodes, target, vram, rate, cost)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- renderer side
class RendererMetrics:
    """A renderer's metrics, recorded through Ray's metrics agent on its node. Outside a Ray
    worker (a renderer used as a plain object, in tests) there is no agent to report to, and
    nothing is recorded."""

    def __init__(self, pool: str, model: str) -> None:
        self._tags = {"pool": pool or NO_POOL, "model": model}
        self._enabled = False
        try:
            import ray

            self._enabled = ray.is_initialized()
        except ImportError:
            pass
        if not self._enabled:
            return
        from ray.util.metrics import Counter, Histogram

        def histogram(spec: MetricSpec) -> Histogram:
            return Histogram(spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels)

        def counter(spec: MetricSpec) -> Counter:
            return Counter(spec.name, spec.help, tag_keys=spec.labels)

        self._render, self._encode, self._write, self._load = (
            histogram(s) for s in (RENDER_SECONDS, ENCODE_SECONDS, WRITE_SECONDS, MODEL_LOAD_SECONDS)
        )
        self._frames, self._video_seconds = counter(FRAMES), counter(VIDEO_SECONDS)

    def model_loaded(self, seconds: float) -> None:
        if self._enabled:
            self._load.observe(seconds, tags=self._tags)

    def clip_made(self, generate_s: float, encode_s: float, write_s: float, frames: int, fps: int) -> None:
        if not self._enabled:
            return
        self._render.observe(generate_s, tags=self._tags)
        self._encode.observe(encode_s, tags=self._tags)
        self._write.observe(write_s, tags=self._tags)
        self._frames.inc(frames, tags=self._tags)
        self._video_seconds.inc(frames / fps, tags=self._tags)
