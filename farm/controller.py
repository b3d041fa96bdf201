"""The controller: one detached, named Ray actor that owns every job's queue and the renderer pools.

It runs the scheduler's decisions against real Ray actors in a background thread:
- renderers are started per pool and model as queued work needs them (cheapest fitting pool
  first), kept resident across jobs, replaced when they die, and retired when another model needs
  the slot;
- each renderer has a bounded number of tasks in flight; results are collected as they finish
  and every attempt goes to the catalog in batches;
- a renderer that dies has its in-flight tasks requeued as interrupted; one that runs a task past
  the job's timeout is killed and replaced, and that attempt counts as failed;
- cancel stops dispatch at once and stops the job's running work after a short grace period.

Its state lives in the catalog: jobs and their task lists are written by the submitting client,
attempts and events by the controller. Ray restarts the actor if it dies, and the new one picks up
every unfinished job from the catalog, adopting clips that were finished but not yet catalogued.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from farm.catalog import AttemptWriter, Catalog, JobRecord, attempt_row
from farm.config import AUTOSCALE_INTERVAL_S
from farm.errors import ClusterError
from farm.metrics import (
    FINISHED_JOB_TTL_S,
    ControllerMetrics,
    FarmSnapshot,
    JobSnapshot,
    PoolSnapshot,
)
from farm.scaling import PoolScaling, ScalingPlan, renderers_to_release, resource_bundles, widest
from farm.scaling import plan as scaling_plan
from farm.scheduler import Decision, Dispatch, JobLimits, Outcome, Scheduler
from farm.storage import OutputTarget, StorageOptions, open_sink
from farm.task import AttemptStatus, ModelRef, Result, Task

CONTROLLER_NAME = "farm-controller"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node
NAMESPACE = "farm"
_WAIT_S = 0.2  # longest a loop turn blocks waiting for results
_POOL_REFRESH_S = 2.0  # how often the cluster's nodes are read for pools
CANCEL_GRACE_S = 2.0  # running attempts of a cancelled job get this long before their renderer is stopped
FINISHED_JOBS_KEPT = 1000

log = logging.getLogger("farm.controller")


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int
    waiting_for_pool: int
    state: str  # running | cancelling | finished | cancelled
    elapsed_s: float
    eta_s: float | None
    renderers: int


@dataclass
class _RunningJob:
    record: JobRecord
    target: OutputTarget
    limits: JobLimits
    model: ModelRef
    writer: AttemptWriter
    started: float
    skipped: int  # tasks already done (or being rendered for another job) when the controller took the job
    todo: set[str] = field(default_factory=set)  # task ids this job renders itself
    cancel_at: float | None = None
    test_faults: object = None


@dataclass
class _Renderer:
    slot: str
    pool: str
    model: ModelRef
    actor: object
    ready: bool = False
    queue: deque = field(default_factory=deque)  # (ref, dispatch) in dispatch order: the head is running
    head_started: float = 0.0
    loads: int = 0
    load_s: float = 0.0
    node_id: str = ""
    actor_id: str = ""
    pid: int = 0


def adopt_finished_outputs(catalog: Catalog, job_id: str, target: OutputTarget, tasks: list[Task]) -> set[str]:
    """Catalog clips whose commit marker is in the output but whose row never reached the catalog
    (the writer died between the two), instead of rendering them again. Also aborts uploads a
    killed renderer left half-done for the others."""
    from farm.render import result_from_record

    sink = open_sink(target)
    adopted: set[str] = set()
    with catalog.writer(job_id) as writer:
        for task in tasks:
            record = sink.get_json(f"{task.task_id}.json")
            if not record or record.get("task_id") != task.task_id:
                continue
            result = result_from_record(record)
            if result.succeeded and sink.matches(f"{task.task_id}.mp4", result.sha256):
                writer.add(attempt_row(task, result, target.uri, final=True, recovered=True))
                adopted.add(task.task_id)
    pending = {t.task_id for t in tasks} - adopted
    sink.abort_incomplete({f"{t}{suffix}" for t in pending for suffix in (".mp4", ".jpg", ".json")})
    return adopted


def job_target(record: JobRecord) -> OutputTarget:
    return OutputTarget(record.output, StorageOptions(**json.loads(record.storage_json or "{}")))


class Controller:
    """Made a detached named actor by ``get_or_start_controller``; a plain class for tests."""

    def __init__(self, catalog_location: str | None = None, metrics_address: str | None = None) -> None:
        import ray

        from farm.config import cluster_catalog_location

        # Identifies this Ray cluster's lifetime: a controller restarted by Ray in the same cluster
        # resumes the jobs admitted here; jobs of a cluster that is gone wait for a re-submit.
        self.session = ray.get_runtime_context().get_session_name() if ray.is_initialized() else "local"
        self.catalog = Catalog(catalog_location or cluster_catalog_location())
        self.scheduler = Scheduler()
        self.lock = threading.RLock()
        self.jobs: dict[str, _RunningJob] = {}
        self.finished: dict[str, JobProgress] = {}
        self.finished_meta: dict[str, tuple[JobRecord, float]] = {}  # job → (record, when it finished)
        self.renderers: dict[str, _Renderer] = {}
        self.pending_starts: dict = {}  # info ref → slot
        self.capacity: dict = {}  # pool name → PoolCapacity
        self.in_flight: dict = {}  # result ref → (slot, Dispatch)
        self._last_pool_refresh = 0.0
        # Autoscaling: the node types Ray's autoscaler can launch (none: a fixed-size cluster).
        self.node_types = []
        self.scaling: ScalingPlan | None = None
        self.requested_bundles: list[dict] | None = None
        self.clip_seconds: dict[str, tuple[float, int]] = {}  # pool → (busy seconds, clips)
        self._pool_busy_at: dict[str, float] = {}
        self._last_autoscale = 0.0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self.errors: deque[str] = deque(maxlen=50)
        self.metrics = ControllerMetrics(self._metrics_snapshot)
        if metrics_address:
            try:
                self.metrics.serve(metrics_address)
            except (OSError, ValueError) as exc:  # metrics are worth a warning, never a stopped farm
                self.errors.append(f"metrics not served on {metrics_address}: {exc}")
        try:
            from farm.cluster import autoscaler_node_types

            self.node_types = autoscaler_node_types()
        except (ClusterError, ValueError, TypeError, AttributeError) as exc:  # a broken config: no scaling
            self.errors.append(f"autoscaling off: {exc}")
        self.launchable = {t.pool.name for t in self.node_types}
        self._refresh_pools()  # pool_scalings() may be asked before the first dispatch turn
        self._last_pool_refresh = time.monotonic()
        self.restored = self._restore()
        self._thread = threading.Thread(target=self._run, name="farm-dispatch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API (remote calls)
    def ping(self) -> dict:
        return {"catalog": self.catalog.location, "jobs": list(self.jobs), "restored": self.restored,
                "pid": os.getpid(), "session": self.session, "metrics": self.metrics.address}

    def metrics_text(self) -> str:
        """The controller's exposition, as a scrape of its metrics port would get it."""
        return self.metrics.exposition().decode()

    def submit(self, job_id: str, test_faults=None) -> JobProgress:
        """Take a job the client has written to the catalog. Submitting the same job twice is harmless.
        ``test_faults`` (tests only) makes matching attempts of this job misbehave."""
        with self.lock:
            if job_id in self.jobs:
                return self._progress(job_id)
            self._admit(self.catalog.job(job_id), test_faults)
            return self._progress(job_id) if job_id in self.jobs else self.finished[job_id]

    def submit_job(self, record: JobRecord, tasks: list[Task], test_faults=None) -> JobProgress:
        """Record a client's job in this controller's catalog and take it: the path for clients
        that do not share the catalog (another machine, a detached submit)."""
        self.catalog.record_tasks(record.job_id, tasks)
        self.catalog.record_job(record)
        return self.submit(record.job_id, test_faults)

    def done(self, task_ids: list[str], output_root: str) -> dict[str, str]:
        """Tasks already rendered into ``output_root``, from this controller's catalog."""
        return self.catalog.done(task_ids, output_root)

    def job_status(self, job_ref: str) -> tuple:
        """(catalog status, live progress or None) of a job by id, prefix or campaign."""
        record = self.catalog.job(job_ref)
        with self.lock:
            live = self._progress(record.job_id) if record.job_id in self.jobs else None
            if live is not None:
                self.jobs[record.job_id].writer.flush()  # the catalog's counts as of now
        return self.catalog.status(record), live

    def job_statuses(self) -> list:
        return self.catalog.statuses(self.catalog.jobs())

    def job_results(self, job_ref: str, keep=None) -> tuple:
        record = self.catalog.job(job_ref)
        return record, self.catalog.results(record, keep)

    def run_summary(self, job_id: str, elapsed_s: float, state: str):
        return self.catalog.run_summary(job_id, elapsed_s, state)

    def progress(self, job_id: str) -> JobProgress | None:
        with self.lock:
            if job_id in self.jobs:
                return self._progress(job_id)
            return self.finished.get(job_id)

    def cancel(self, job_id: str) -> JobProgress | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return self.finished.get(job_id)
            if job.cancel_at is None:
                job.cancel_at = time.monotonic() + CANCEL_GRACE_S
                self.scheduler.cancel(job_id)
            return self._progress(job_id)

    def pools(self) -> list[dict]:
        with self.lock:
            out = []
            for name, cap in self.capacity.items():
                members = [r for r in self.renderers.values() if r.pool == name]
                out.append({
                    "pool": name, "gpu_type": cap.pool.gpu_type, "vram_gb": cap.pool.vram_gb,
                    "cost_per_hour": cap.pool.cost_per_hour, "slots": cap.slots, "nodes": list(cap.nodes),
                    "renderers": [{
                        "slot": r.slot, "model": r.model.spec, "ready": r.ready, "node_id": r.node_id,
                        "busy": [f"{j}/{t}" for j, t in self.scheduler.slot_load(r.slot)],
                    } for r in members],
                })
            return out

    def renderer_stats(self) -> list[dict]:
        with self.lock:
            return [{"slot": r.slot, "pool": r.pool, "model": r.model.spec, "loads": r.loads, "load_s": r.load_s,
                     "ready": r.ready, "node_id": r.node_id, "actor_id": r.actor_id, "pid": r.pid}
                    for r in self.renderers.values()]

    def pool_scalings(self, now: float | None = None) -> list[PoolScaling]:
        """Every pool as the scaling decisions see it: the launchable ones (nodes now, min/max,
        measured seconds per clip, idle time) and the fixed ones, which take their share."""
        now = time.monotonic() if now is None else now
        with self.lock:
            out = []
            for t in self.node_types:
                cap = self.capacity.get(t.pool.name)
                out.append(PoolScaling(t.pool, len(cap.nodes) if cap else 0, t.slots_per_node, t.min_workers,
                                       t.max_workers, self._clip_seconds(t.pool.name),
                                       now - self._pool_busy_at.get(t.pool.name, self.started)))
            out += [PoolScaling.fixed(cap.pool, len(cap.nodes), cap.slots, self._clip_seconds(name))
                    for name, cap in self.capacity.items() if name not in self.launchable]
            return out

    def _clip_seconds(self, pool: str) -> float | None:
        busy_s, clips = self.clip_seconds.get(pool, (0.0, 0))
        return busy_s / clips if clips else None

    def scaling_status(self) -> dict:
        """What the controller last asked the autoscaler for, and why."""
        with self.lock:
            plan = self.scaling
            return {
                "node_types": [asdict(t) for t in self.node_types],
                "requested_bundles": list(self.requested_bundles or []),
                "decisions": [asdict(d) for d in plan.decisions] if plan else [],
                "estimates": [asdict(e) for e in plan.estimates] if plan else [],
                "backlog": dict(plan.backlog) if plan else {},
                "unroutable": plan.unroutable if plan else 0,
            }

    def recent_errors(self) -> list[str]:
        return list(self.errors)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self.lock:
            for job in self.jobs.values():
                job.writer.flush()
        self.metrics.stop()

    # ------------------------------------------------------------------ admission and restore
    def _restore(self) -> list[str]:
        """After a restart by Ray, pick up every job this cluster's controller had admitted and
        not finished."""
        restored = []
        for record in self.catalog.jobs():
            events = self.catalog.events(record.job_id)
            if not events or events[-1]["event"] != "admitted" or events[-1]["detail"] != self.session:
                continue
            try:
                self._admit(record)
                restored.append(record.job_id)
            except Exception as exc:  # one bad job must not keep the controller down
                self.errors.append(f"restore {record.job_id}: {exc}")
        return restored

    def _admit(self, record: JobRecord, test_faults=None) -> None:
        tasks = self.catalog.tasks(record.job_id)
        target = job_target(record)
        done = self.catalog.done([t.task_id for t in tasks], target.uri)
        todo = [t for t in tasks if t.task_id not in done]
        adopted = adopt_finished_outputs(self.catalog, record.job_id, target, todo) if todo else set()
        todo = [t for t in todo if t.task_id not in adopted]
        # A task another running job renders into the same output is rendered once, for that job.
        busy = {t for j in self.jobs.values() if j.target.uri == target.uri for t in j.todo}
        todo = [t for t in todo if t.task_id not in busy]
        limits = JobLimits(max_attempts=record.max_attempts)
        model = tasks[0].model if tasks else None
        if not todo:
            self.catalog.record_event(record.job_id, "finished", "nothing to render")
            self.finished[record.job_id] = JobProgress(record.job_id, len(tasks), len(tasks), 0, 0, 0, 0,
                                                       "finished", 0.0, 0.0, 0)
            return
        self.scheduler.add_job(record.job_id, todo, record.priority, limits, model.identity)
        self.jobs[record.job_id] = _RunningJob(record, target, limits, model, self.catalog.writer(record.job_id),
                                               time.monotonic(), len(tasks) - len(todo),
                                               {t.task_id for t in todo}, test_faults=test_faults)
        self.catalog.record_event(record.job_id, "admitted", self.session)
        self.metrics.job_admitted(record.job_id)

    def _progress(self, job_id: str) -> JobProgress:
        job = self.jobs[job_id]
        p = self.scheduler.progress(job_id)
        elapsed = time.monotonic() - job.started
        finished = p.succeeded + p.failed
        remaining = p.total - finished
        eta = elapsed / finished * remaining if finished else None
        if p.cancelled:
            state = "cancelled" if p.finished else "cancelling"
        else:
            state = "finished" if p.finished else "running"
        renderers = sum(1 for r in self.renderers.values() if r.model.identity == job.model.identity and r.ready)
        return JobProgress(job_id, p.total + job.skipped, p.succeeded + job.skipped, p.failed, p.in_flight,
                           p.queued, self.scheduler.waiting_without_pool(job_id), state, elapsed, eta, renderers)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception:  # keep dispatching; the error is visible through recent_errors()
                self.errors.append(traceback.format_exc(limit=5))
                time.sleep(0.5)

    def _turn(self) -> None:
        import ray

        now = time.monotonic()
        with self.lock:
            if now - self._last_pool_refresh >= _POOL_REFRESH_S:
                self._refresh_pools()
                self._last_pool_refresh = now
            if self.node_types and now - self._last_autoscale >= AUTOSCALE_INTERVAL_S:
                self._last_autoscale = now
                try:
                    self._autoscale(now)
                except Exception:  # scaling is advisory: it must never stop dispatch
                    self.errors.append("autoscale: " + traceback.format_exc(limit=3))
            self._scale_renderers()
            self._check_timeouts_and_cancels()
            for d in self.scheduler.next_dispatches():
                self._send(d)
            for decision in self.scheduler.drain_decisions():  # taken while dispatching
                self._apply(decision, None, None)
            waiting = list(self.in_flight) + list(self.pending_starts)
        if not waiting:
            time.sleep(_WAIT_S)
        else:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=_WAIT_S)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            with self.lock:
                for ref in ready:
                    if ref in self.pending_starts:
                        self._renderer_started(ref)
                    elif ref in self.in_flight:
                        self._collect(ref)
        with self.lock:
            for job_id in list(self.jobs):
                self.jobs[job_id].writer.maybe_flush()
                self._maybe_finish(job_id)

    def _refresh_pools(self) -> None:
        from farm.cluster import discover_pools

        capacities = {c.pool.name: c for c in discover_pools()}
        for cap in capacities.values():
            self.scheduler.add_pool(cap.pool)
        for node_type in self.node_types:  # pools the autoscaler can start: work for them waits in the queue
            self.scheduler.add_pool(node_type.pool)
        self.capacity = capacities

    def _autoscale(self, now: float) -> None:
        """Size each launchable pool for the backlog (and the tightest deadline of the running
        jobs), and hand the result to Ray's autoscaler as a standing request."""
        from ray.autoscaler.sdk import request_resources

        pools = self.pool_scalings(now)
        live = [j for j in self.jobs.values() if j.cancel_at is None]
        deadlines = [(j.record.deadline_at - datetime.now(UTC)).total_seconds()
                     for j in live if j.record.deadline_at is not None]
        # Queued work goes where the plan routes it; running work counts for the pool running it.
        running = Counter(r.pool for r in self.renderers.values() for _ in r.queue)
        queued = self.scheduler.backlog_by_needs(in_flight=False)
        plan = scaling_plan(pools, by_pool=running, by_needs=queued, deadline_s=min(deadlines) if deadlines else None)
        if deadlines and len(deadlines) < len(live):  # jobs without a deadline are not to be slowed by one
            plan = widest(plan, scaling_plan(pools, by_pool=running, by_needs=queued))
        for name, backlog in plan.backlog.items():
            if backlog:
                self._pool_busy_at[name] = now
        for r in self.renderers.values():
            if r.queue or not r.ready:  # rendering or loading: the pool is not idle, whatever the plan says
                self._pool_busy_at[r.pool] = now
        for d in plan.decisions:
            if d.pool in self.launchable and not plan.backlog.get(d.pool):
                self._release_idle_renderers(d.pool, keep=d.target_workers * d.slots_per_worker)
        bundles = resource_bundles([d for d in plan.decisions if d.pool in self.launchable])
        if bundles != self.requested_bundles:
            request_resources(bundles=bundles)  # replaces the previous request; [] withdraws it
            self.requested_bundles = bundles
        self.scaling = plan

    def _release_idle_renderers(self, pool: str, keep: int) -> None:
        """A resident renderer holds its node's farm_pool slot, so Ray's autoscaler never sees the
        node idle: once the pool is scaled down, stop idle renderers beyond what it keeps."""
        renderers = [r for r in self.renderers.values() if r.pool == pool]
        for slot in renderers_to_release([(r.slot, r.node_id, r.ready and not r.queue) for r in renderers], keep):
            self._retire(self.renderers[slot], "pool scaled down: its node may go")

    def _scale_renderers(self) -> None:
        """Start renderers where queued work needs them: for each job in priority order, in the
        cheapest fitting pool with a free slot; retire an idle renderer of another model if that
        is the only way to get a slot."""
        from farm.cluster import start_renderer

        demand = self.scheduler.demand()
        for model_identity, _priority, needs_groups, queued in demand:
            job = next((j for j in self.jobs.values() if j.model.identity == model_identity), None)
            if job is None:
                continue
            serving = [r for r in self.renderers.values() if r.model.identity == model_identity]
            if len(serving) >= queued:
                continue
            pools = sorted({p.name: p for n in needs_groups for p in self.scheduler.routes(n)}.values(),
                           key=lambda p: (p.cost_per_hour, p.name))
            for pool in pools:
                cap = self.capacity.get(pool.name)
                if cap is None:
                    continue
                used = [r for r in self.renderers.values() if r.pool == pool.name]
                if len(used) >= cap.slots:
                    idle_other = [r for r in used if r.model.identity != model_identity and r.ready
                                  and not r.queue and not self._model_has_work(r.model.identity)]
                    if not idle_other:
                        continue
                    self._retire(idle_other[0], "another model needs the slot")
                slot = f"{pool.name}-{uuid.uuid4().hex[:6]}"
                actor = start_renderer(job.model, cap)
                self.renderers[slot] = _Renderer(slot, pool.name, job.model, actor)
                self.pending_starts[actor.info.remote()] = slot
                break

    def _model_has_work(self, model_identity: str) -> bool:
        return any(m == model_identity for m, *_ in self.scheduler.demand())

    def _renderer_started(self, ref) -> None:
        import ray

        slot = self.pending_starts.pop(ref)
        renderer = self.renderers.get(slot)
        if renderer is None:
            return
        try:
            info = ray.get(ref)
        except Exception as exc:  # died while loading (node lost, OOM)
            self.errors.append(f"renderer {slot} did not start: {str(exc).splitlines()[0]}")
            self.renderers.pop(slot, None)
            return
        if info.load_error:
            self.errors.append(f"renderer {slot}: {info.load_error}")
            self._fail_model_jobs(renderer.model, info.load_error)
            self._retire(renderer, "model did not load")
            return
        renderer.ready, renderer.loads, renderer.load_s = True, info.pipeline_loads, info.load_seconds
        renderer.node_id, renderer.actor_id, renderer.pid = info.node_id, info.actor_id, info.pid
        self.metrics.record_model_load(renderer.pool, renderer.model.spec)
        self.scheduler.add_slot(slot, renderer.pool, renderer.model.identity)

    def _fail_model_jobs(self, model: ModelRef, error: str) -> None:
        for job_id, job in list(self.jobs.items()):
            if job.model.identity == model.identity:
                self.scheduler.cancel(job_id)
                self.catalog.record_event(job_id, "failed", f"model did not load: {error}")
                job.cancel_at = time.monotonic()

    def _send(self, d: Dispatch) -> None:
        renderer = self.renderers[d.slot]
        job = self.jobs[d.job_id]
        ref = renderer.actor.render.remote(d.task, d.attempt, job.target, job.test_faults)
        if not renderer.queue:
            renderer.head_started = time.monotonic()
        renderer.queue.append((ref, d))
        self.in_flight[ref] = (d.slot, d)

    def _collect(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        slot, d = self.in_flight.pop(ref)
        try:
            result: Result = ray.get(ref)
        except RayActorError as exc:
            # Still in the renderer's queue: _renderer_lost sees whether it was the one running.
            self._renderer_lost(slot, str(exc).splitlines()[0] if str(exc) else "renderer died")
            return
        except RayTaskError as exc:
            result = Result(d.task.task_id, d.attempt, AttemptStatus.FAILED,
                            error=str(exc).strip().splitlines()[-1][:2000], started_at=time.time(),
                            finished_at=time.time(), error_kind="other")
        renderer = self.renderers.get(slot)
        if renderer is not None:
            if renderer.queue and renderer.queue[0][0] == ref:
                renderer.queue.popleft()
                renderer.head_started = time.monotonic()
            else:
                renderer.queue = deque(item for item in renderer.queue if item[0] != ref)
        if result.succeeded:  # measured clip time per pool: what deadline estimates are made of
            busy_s, clips = self.clip_seconds.get(_pool_of(slot), (0.0, 0))
            t = result.timings
            self.clip_seconds[_pool_of(slot)] = (busy_s + t.generate_s + t.encode_s + t.write_s, clips + 1)
        decision = self.scheduler.record(slot, d.job_id, d.task.task_id, result.succeeded, result.error)
        self._apply(decision, d, result)

    def _apply(self, decision: Decision, d: Dispatch | None, result: Result | None) -> None:
        job = self.jobs.get(decision.job_id)
        if job is None:
            return
        task = d.task if d else decision.task
        if task is None:
            return
        if result is None:  # a decision without an attempt result: interrupted, poison task, stuck job
            status = {Outcome.FAILED: AttemptStatus.FAILED, Outcome.DROPPED: AttemptStatus.CANCELLED}.get(
                decision.outcome, AttemptStatus.INTERRUPTED)
            # With a dispatch its renderer died under it; without one the scheduler gave up on the
            # job's renderers after repeated failures.
            result = Result(decision.task_id, d.attempt if d else decision.attempt, status, error=decision.reason,
                            started_at=time.time(), finished_at=time.time(),
                            error_kind="renderer_lost" if d else "bad_renderer")
        elif decision.outcome is Outcome.DROPPED and not result.succeeded:
            result = replace(result, status=AttemptStatus.CANCELLED)
        job.writer.add(attempt_row(task, result, job.target.uri, final=decision.final))
        self.metrics.record_attempt(decision.job_id, _pool_of(d.slot) if d else "", job.model.spec,
                                    result.status.value, result.error_kind, decision.outcome is Outcome.RETRY)

    # ------------------------------------------------------------------ metrics
    def _metrics_snapshot(self) -> FarmSnapshot:
        """What the gauges show at a scrape: running jobs, jobs finished within the TTL, pools."""
        with self.lock:
            now = time.monotonic()
            for job_id, (_, finished_at) in list(self.finished_meta.items()):
                if now - finished_at > FINISHED_JOB_TTL_S:
                    del self.finished_meta[job_id]
                    self.metrics.forget_job(job_id)
            jobs = [(job.record, self._progress(job_id)) for job_id, job in self.jobs.items()]
            jobs += [(record, self.finished[job_id]) for job_id, (record, _) in self.finished_meta.items()
                     if job_id in self.finished and job_id not in self.jobs]
            wall_now = datetime.now(UTC)
            job_snaps = [JobSnapshot(
                record.job_id, record.campaign, record.model, record.priority, p.state,
                {"queued": p.queued - p.waiting_for_pool, "waiting_for_pool": p.waiting_for_pool,
                 "running": p.in_flight, "succeeded": p.succeeded, "failed": p.failed},
                (p.succeeded + p.failed) / p.total if p.total else 1.0,
                p.eta_s if p.state in ("running", "cancelling") else 0.0,
                (record.deadline_at - wall_now).total_seconds() if record.deadline_at is not None else None,
            ) for record, p in jobs]
            targets = {d.pool: d.target_workers for d in self.scaling.decisions} if self.scaling else {}
            pools = {name: (cap.pool, cap) for name, cap in self.capacity.items()}
            pools.update({t.pool.name: (t.pool, None) for t in self.node_types if t.pool.name not in pools})
            pool_snaps = []
            for name, (pool, cap) in sorted(pools.items()):
                states = {"busy": 0, "idle": 0, "loading": 0}
                for r in self.renderers.values():
                    if r.pool == name:
                        states["loading" if not r.ready else "busy" if r.queue else "idle"] += 1
                pool_snaps.append(PoolSnapshot(name, pool.gpu_type or "", pool.vram_gb, pool.cost_per_hour,
                                               cap.slots if cap else 0, states, len(cap.nodes) if cap else 0,
                                               targets.get(name, 0) if name in self.launchable else None))
            return FarmSnapshot(job_snaps, pool_snaps)

    def _renderer_lost(self, slot: str, reason: str) -> None:
        renderer = self.renderers.pop(slot, None)
        queued = list(renderer.queue) if renderer else []
        for ref, _ in queued:
            self.in_flight.pop(ref, None)
        dispatches = {(d.job_id, d.task.task_id): d for _, d in queued}
        running = queued[0][1].task.task_id if queued else None
        for decision in self.scheduler.remove_slot(slot, reason, running):
            self._apply(decision, dispatches.get((decision.job_id, decision.task_id)), None)

    def _retire(self, renderer: _Renderer, reason: str) -> None:
        import ray

        self._renderer_lost(renderer.slot, reason)
        ray.kill(renderer.actor, no_restart=True)

    def _check_timeouts_and_cancels(self) -> None:
        import ray

        now = time.monotonic()
        for renderer in list(self.renderers.values()):
            if not renderer.queue:
                continue
            ref, head = renderer.queue[0]
            job = self.jobs.get(head.job_id)
            if job is None:
                continue
            if job.cancel_at is not None and now >= job.cancel_at:
                self._retire(renderer, "job cancelled")
                continue
            if now - renderer.head_started > job.record.timeout_s:
                # The attempt counts as failed (retried with backoff); the renderer is replaced.
                self.in_flight.pop(ref, None)
                renderer.queue.popleft()
                reason = f"timed out after {job.record.timeout_s:g}s on renderer {renderer.slot}"
                decision = self.scheduler.record(renderer.slot, head.job_id, head.task.task_id, False, reason)
                result = Result(head.task.task_id, head.attempt, AttemptStatus.FAILED, error=reason,
                                node_id=renderer.node_id, started_at=time.time(), finished_at=time.time(),
                                error_kind="timeout")
                self._apply(decision, head, result)
                self._renderer_lost(renderer.slot, "stopped after a timeout")
                ray.kill(renderer.actor, no_restart=True)

    def _maybe_finish(self, job_id: str) -> None:
        job = self.jobs[job_id]
        p = self.scheduler.progress(job_id)
        if not p.finished:
            return
        job.writer.flush()
        final = self._progress(job_id)
        event = "cancelled" if p.cancelled else "finished"
        self.catalog.record_event(job_id, event, f"{p.succeeded} succeeded, {p.failed} failed")
        self.finished[job_id] = final
        self.finished_meta[job_id] = (job.record, time.monotonic())
        while len(self.finished) > FINISHED_JOBS_KEPT:
            self.finished.pop(next(iter(self.finished)))
        self.scheduler.forget(job_id)
        del self.jobs[job_id]


def _pool_of(slot: str) -> str:
    return slot.rsplit("-", 1)[0]  # slots are named <pool>-<random hex>


def get_or_start_controller(catalog_location: str | None, metrics_address: str | None = None):
    """The cluster's controller actor, started (detached, restarted by Ray if it dies) if absent,
    with the catalog at ``catalog_location`` (None: the head node's FARM_CATALOG, else
    ~/farm-data/catalog there). A running one keeps the catalog it has: the cluster
    has one catalog, and clients go through the controller to it (``ping()["catalog"]`` says where).
    ``metrics_address`` is where a newly started one serves its metrics (None: the configured one)."""
    import ray

    from farm.config import metrics_address as configured_metrics_address

    actor = ray.remote(Controller).options(
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=32,
        num_cpus=0,
        # On the head node: it outlives worker nodes (spot instances come and go; the head stays).
        resources={HEAD_NODE_RESOURCE: 0.001},
    ).remote(catalog_location, metrics_address if metrics_address is not None else configured_metrics_address())
    ray.get(actor.ping.remote())  # started and restored: ready for calls
    return actor
