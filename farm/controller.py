"""The controller: one detached, named Ray actor that owns every job's queue and the renderer pools.

It composes the pure parts and carries out their decisions against Ray in a background thread:
- the job book (farm/jobs.py) admits jobs from the catalog, reports progress, records their ends;
- the scheduler (farm/scheduler.py) decides which task goes to which renderer slot, and what a
  failure, a lost renderer or a cancel means;
- the fleet (farm/fleet.py) decides which renderers to start where, replace and retire: started
  per pool and model as queued work needs them (cheapest fitting pool first), kept resident across
  jobs, replaced when they die or time out, retired when another model needs the slot or the pool
  shrinks;
- scaling (farm/scaling.py) sizes the pools Ray's autoscaler can launch.

Each renderer has a bounded number of calls in flight, each one task or (short tasks, once
measured) a batch of them; results are collected as they finish and every attempt goes to the
catalog in batches. A renderer that dies has the clips it committed but never reported adopted
from their commit markers, and its other in-flight tasks requeued as interrupted; one that runs
a task past the job's timeout is killed and replaced, and that attempt counts as failed. Cancel
stops dispatch at once and stops the job's running work after a short grace period.

Its state lives in the catalog: jobs and their task lists are written by the submitting client,
attempts and events by the controller. Ray restarts the actor if it dies, and the new one picks up
every unfinished job from the catalog, adopting clips that were finished but not yet catalogued.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from farm.catalog import Catalog, JobStatus, ResultFilter, RunSummary
from farm.config import AUTOSCALE_INTERVAL_S, CONTROLLER_WAIT_S, FINISHED_JOB_TTL_S, POOL_REFRESH_S
from farm.controller_view import farm_snapshot
from farm.errors import ClusterError
from farm.fleet import (
    Batch,
    FailModelJobs,
    Fleet,
    FleetDecision,
    RendererReady,
    RendererRecord,
    RetireRenderer,
    StartRenderer,
    TimedOut,
    pool_of,
)
from farm.jobs import JobBook, JobProgress, attempt_result, committed_result
from farm.metrics import ControllerMetrics, FarmSnapshot
from farm.records import JobRecord
from farm.scaling import Autoscaling, PoolScaling
from farm.scheduler import Decision, Dispatch, Outcome, Scheduler
from farm.storage import OutputTarget, open_sink
from farm.task import AttemptStatus, FailureKind, Result, Task

CONTROLLER_NAME = "farm-controller"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node
NAMESPACE = "farm"

log = logging.getLogger("farm.controller")


def _first_line(exc: BaseException, default: str) -> str:
    return (str(exc).strip().splitlines() or [default])[0]


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the OS (``top -H``, /proc/<pid>/task/*/comm): the controller's
    process has Ray's threads beside its own, and per-thread CPU is how its cost is measured."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: names are a convenience
        pass


class CatalogQueries:
    """Read-only catalog queries the controller answers for clients that cannot reach its catalog
    (another machine, ``--address``): one role of the controller, kept apart from running jobs."""

    catalog: Catalog

    def done(self, task_ids: list[str], output_root: str) -> dict[str, str]:
        """Tasks already rendered into ``output_root``, from this controller's catalog."""
        return self.catalog.done(task_ids, output_root)

    def job_statuses(self) -> list[JobStatus]:
        return self.catalog.statuses(self.catalog.jobs())

    def job_results(self, job_ref: str, keep: ResultFilter | None = None) -> tuple[JobRecord, list[dict[str, Any]]]:
        record = self.catalog.job(job_ref)
        return record, self.catalog.results(record, keep)

    def run_summary(self, job_id: str, elapsed_s: float, state: str) -> RunSummary:
        return self.catalog.run_summary(job_id, elapsed_s, state)


def pickle_plainly(*classes: type) -> None:
    """Ray pickles call arguments with cloudpickle, whose Python hooks run for every object and
    class inside them; a Task (sent with every attempt) and its output target are plain
    dataclasses the C pickler handles alone, in a third of the time. Only this process's
    serialization changes: the receiver unpickles as ever."""
    from ray.util import register_serializer

    for cls in classes:
        register_serializer(cls, serializer=pickle.dumps, deserializer=pickle.loads)


class RendererCalls:
    """The controller's calls to its renderers and what comes back: fleet and scheduler decisions
    carried out against Ray, attempts sent (one or a batch a call), results collected and written,
    renderers lost, retired or timed out (their committed clips adopted). One role of the
    controller, kept apart from its remote API and its loop."""

    scheduler: Scheduler
    fleet: Fleet
    book: JobBook
    metrics: ControllerMetrics
    autoscaling: Autoscaling
    errors: deque[str]
    _touched: set[str]
    _fleet_changed: bool

    def _carry_out(self, decisions: Iterable[FleetDecision]) -> None:
        """Carry out the fleet's decisions against Ray, the scheduler and the job book."""
        for d in decisions:
            self._fleet_changed = True
            if isinstance(d, StartRenderer):
                log.info("start renderer %s (%s): %s", d.slot, d.model.spec, d.reason)
                handle = self.fleet.start(d)
                self.fleet.watch_start(handle.info.remote(), d.slot)  # resolves once the model is loaded
            elif isinstance(d, RetireRenderer):
                log.info("retire renderer %s: %s", d.slot, d.reason)
                self._retire(d.slot, d.reason)
            elif isinstance(d, RendererReady):
                self.metrics.record_model_load(d.pool, d.model.spec)
                self.scheduler.add_slot(d.slot, d.pool, d.model.identity)
            elif isinstance(d, FailModelJobs):
                self.errors.append(f"{d.model.spec}: {d.reason}")
                self.book.fail_model(d.model, d.reason)
            elif isinstance(d, TimedOut):
                self._timed_out(d)

    def _timed_out(self, d: TimedOut) -> None:
        """The attempt it was stuck in counts as failed (retried with backoff); the renderer is replaced."""
        self._retire(d.slot, "stopped after a timeout", d)

    def _renderer_started(self, slot: str, ref) -> None:
        import ray

        try:
            info = ray.get(ref)
        except Exception as exc:  # died while loading (node lost, OOM)
            self.errors.append(f"renderer {slot} did not start: {_first_line(exc, repr(exc))}")
            self._renderer_lost(slot, "did not start")
            return
        self._carry_out(self.fleet.loaded(slot, info))

    def _renderer_lost(self, slot: str, reason: str, timed_out: TimedOut | None = None) -> RendererRecord | None:
        """A renderer died or is being stopped: the clips it committed but never reported are
        adopted; the rest of what it had queued goes back to the scheduler (the head batch was
        running, the others only waited). ``timed_out``: it is stopped for running too long."""
        renderer = self.fleet.remove(slot)
        self._fleet_changed = True  # a replacement may be due
        batches = [batch for _, batch in renderer.queue] if renderer else []
        left = self._adopt_committed(slot, batches)
        head = [d for d in batches[0] if d in left] if batches else []
        if timed_out is not None and head and renderer is not None:
            stuck, head = head[0], head[1:]  # a batch renders in order: the first not committed
            decision = self.scheduler.record(slot, stuck.job_id, stuck.task.task_id, False, timed_out.reason)
            result = attempt_result(
                stuck.task.task_id, stuck.attempt, AttemptStatus.FAILED, timed_out.reason, FailureKind.TIMEOUT
            )
            self._apply(decision, stuck, replace(result, node_id=renderer.node_id))
        # One task alone is known to have been running; of a batch any may have killed it.
        single = len(batches[0]) == 1 if batches else False
        running = head[0].task.task_id if single and head and timed_out is None else None
        solo = [] if single else [d.task.task_id for d in head]
        dispatches = {(d.job_id, d.task.task_id): d for d in left}
        for decision in self.scheduler.remove_slot(slot, reason, running, solo):
            self._apply(decision, dispatches.get((decision.job_id, decision.task_id)), None)
        return renderer

    def _adopt_committed(self, slot: str, batches: list[Batch]) -> list[Dispatch]:
        """Attempts of a renderer that went whose clips it committed before going (each clip of a
        batch is committed as it finishes): done, read from their commit markers as a restarted
        controller adopts them. Returns the other attempts, in order."""
        left: list[Dispatch] = []
        for batch in batches:
            job = self.book.jobs.get(batch[0].job_id)
            try:
                sink = open_sink(job.target) if job else None
                committed = [committed_result(sink, d.task) if sink else None for d in batch]
            except Exception as exc:  # unreadable output: render them again rather than guess
                self.errors.append(f"commit markers of {slot}'s clips unread: {_first_line(exc, repr(exc))}")
                committed = [None] * len(batch)
            for d, result in zip(batch, committed, strict=True):
                if result is None:
                    left.append(d)
                    continue
                # This attempt's own clip and timings: only the way its result came back differs.
                decision = self.scheduler.record(slot, d.job_id, d.task.task_id, True)
                self._apply(decision, d, result)
        return left

    def _retire(self, slot: str, reason: str, timed_out: TimedOut | None = None) -> None:
        import ray

        renderer = self._renderer_lost(slot, reason, timed_out)
        if renderer is not None:
            ray.kill(renderer.handle, no_restart=True)

    # ------------------------------------------------------------------ attempts
    def _send(self, batch: list[Dispatch]) -> None:
        """One call to the slot's renderer: one attempt, or a batch of one job's short ones."""
        renderer = self.fleet.renderers[batch[0].slot]
        target = self.book.jobs[batch[0].job_id].target
        if len(batch) == 1:
            ref = renderer.handle.render.remote(batch[0].task, batch[0].attempt, target)
        else:
            ref = renderer.handle.render_batch.remote([(d.task, d.attempt) for d in batch], target)
        self.fleet.sent(ref, tuple(batch))

    def _collect(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        slot, batch = self.fleet.in_flight[ref]
        try:
            got: Result | list[Result] = ray.get(ref)
        except RayActorError as exc:
            # Still on the renderer's queue: _renderer_lost sees what it had committed and was running.
            self._renderer_lost(slot, _first_line(exc, "renderer died"))
            return
        except RayTaskError as exc:  # the call broke, not a task (those come back as results)
            error = str(exc).strip().splitlines()[-1][:2000]
            self.fleet.collected(ref)
            for d in self._adopt_committed(slot, [batch]):  # a batch commits each clip as it finishes
                failed = attempt_result(d.task.task_id, d.attempt, AttemptStatus.FAILED, error, FailureKind.OTHER)
                self._record_result(slot, d, failed)
            return
        self.fleet.collected(ref)
        for d, result in zip(batch, got if isinstance(got, list) else [got], strict=True):
            self._record_result(slot, d, result)

    def _record_result(self, slot: str, d: Dispatch, result: Result) -> None:
        seconds = 0.0
        if result.succeeded:  # measured clip time per pool: what deadline estimates are made of
            t = result.timings
            self.autoscaling.record_clip(pool_of(slot), t.generate_s + t.encode_s + t.write_s)
            seconds = result.finished_at - result.started_at  # on its renderer: what batches are sized by
        oom = result.error_kind is FailureKind.OOM  # retried on a pool with more VRAM (scheduler.py)
        decision = self.scheduler.record(slot, d.job_id, d.task.task_id, result.succeeded, result.error, oom, seconds)
        self._apply(decision, d, result)

    def _apply(self, decision: Decision, d: Dispatch | None, result: Result | None) -> None:
        """Write an attempt the scheduler decided on to its job's catalog rows and the metrics."""
        self._touched.add(decision.job_id)
        written = self.book.record_attempt(decision, d, result)
        if written is not None:
            model, result = written
            retry = decision.outcome is Outcome.RETRY
            pool = pool_of(d.slot) if d else ""
            kind = result.error_kind.value if result.error_kind else ""
            self.metrics.record_attempt(decision.job_id, pool, model, result.status.value, kind, retry)


class Controller(CatalogQueries, RendererCalls):
    """Made a detached named actor by ``get_or_start_controller``; a plain class for tests."""

    def __init__(self, catalog_location: str | None = None, metrics_address: str | None = None) -> None:
        import ray

        from farm.cluster import autoscaler_node_types, start_renderer
        from farm.config import cluster_catalog_location

        # Identifies this Ray cluster's lifetime: a controller restarted by Ray in the same cluster
        # resumes the jobs admitted here; jobs of a cluster that is gone wait for a re-submit.
        self.session = ray.get_runtime_context().get_session_name() if ray.is_initialized() else "local"
        if ray.is_initialized():
            pickle_plainly(Task, OutputTarget)
        self.catalog = Catalog(catalog_location or cluster_catalog_location())
        self.scheduler = Scheduler()
        self.fleet = Fleet(start_renderer)
        self.book = JobBook(self.catalog, self.scheduler, self.session, self.fleet.ready_count)
        self.lock = threading.RLock()
        self.started = time.monotonic()
        self._last_pool_refresh = self._last_autoscale = 0.0
        # The fleet is looked over (renderers to start, overdue attempts) every CONTROLLER_WAIT_S,
        # and at once after anything that may change its answer (a job in, a renderer started or lost).
        self._fleet_looked_at, self._fleet_changed = 0.0, True
        self._wake = threading.Event()  # ends the loop's idle wait early: a job came in
        self._touched: set[str] = set()  # jobs with attempts written since the loop last looked
        self._stop = threading.Event()
        self.errors: deque[str] = deque(maxlen=50)
        self.metrics = ControllerMetrics(self._metrics_snapshot)
        if metrics_address:
            try:
                self.metrics.serve(metrics_address)
            except (OSError, ValueError) as exc:  # metrics are worth a warning, never a stopped farm
                self.errors.append(f"metrics not served on {metrics_address}: {exc}")
        try:
            node_types = autoscaler_node_types()
        except (ClusterError, ValueError, TypeError, AttributeError) as exc:  # a broken config: no scaling
            node_types = []
            self.errors.append(f"autoscaling off: {exc}")
        self.autoscaling = Autoscaling(node_types, self.started)
        self._refresh_pools()  # pool_scalings() may be asked before the first dispatch turn
        self._last_pool_refresh = time.monotonic()
        self.restored, errors = self.book.restore()
        self.errors.extend(errors)
        for job_id in self.restored:
            self.metrics.job_admitted(job_id)
        self._thread = threading.Thread(target=self._run, name="farm-dispatch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API (remote calls)
    def ping(self) -> dict:
        return {
            "catalog": self.catalog.location,
            "jobs": list(self.book.jobs),
            "restored": self.restored,
            "pid": os.getpid(),
            "session": self.session,
            "metrics": self.metrics.address,
        }

    def metrics_text(self) -> str:
        """The controller's exposition, as a scrape of its metrics port would get it."""
        return self.metrics.exposition().decode()

    def submit(self, job_id: str) -> JobProgress:
        """Take a job the client has written to the catalog. Submitting the same job twice is harmless."""
        with self.lock:
            if job_id in self.book.jobs:
                return self.book.live_progress(job_id)
            progress = self.book.admit(self.catalog.job(job_id))
            if job_id in self.book.jobs:
                self.metrics.job_admitted(job_id)
                self._fleet_changed = True
                self._wake.set()
            return progress

    def submit_job(self, record: JobRecord, tasks: list[Task]) -> JobProgress:
        """Record a client's job in this controller's catalog and take it: the path for clients
        that do not share the catalog (another machine, a detached submit)."""
        self.catalog.record_tasks(record.job_id, tasks)
        self.catalog.record_job(record)
        return self.submit(record.job_id)

    def job_status(self, job_ref: str) -> tuple:
        """(catalog status, live progress or None) of a job by id, prefix or campaign."""
        record = self.catalog.job(job_ref)
        with self.lock:
            job = self.book.jobs.get(record.job_id)
            live = self.book.progress(record.job_id) if job else None
            if job:
                job.writer.flush()  # the catalog's counts as of now
        return self.catalog.status(record), live

    def progress(self, job_id: str) -> JobProgress | None:
        with self.lock:
            return self.book.progress(job_id)

    def cancel(self, job_id: str) -> JobProgress | None:
        with self.lock:
            return self.book.cancel(job_id)

    def pools(self) -> list[dict]:
        with self.lock:
            return self.fleet.pools()

    def renderer_stats(self) -> list[dict]:
        with self.lock:
            return self.fleet.stats()

    def pool_scalings(self, now: float | None = None) -> list[PoolScaling]:
        """Every pool as the scaling decisions see it (see ``Autoscaling.pool_scalings``)."""
        with self.lock:
            return self.autoscaling.pool_scalings(self.fleet.capacity, time.monotonic() if now is None else now)

    def scaling_status(self) -> dict:
        """What the controller last asked the autoscaler for, and why."""
        with self.lock:
            return self.autoscaling.status()

    def recent_errors(self) -> list[str]:
        return list(self.errors)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self.lock:
            self.book.flush()
        self.metrics.stop()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        _name_os_thread("farm-dispatch")
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception:  # keep dispatching; the error is visible through recent_errors()
                self.errors.append(traceback.format_exc(limit=5))
                time.sleep(0.5)

    def _turn(self) -> None:
        import ray

        with self.lock:
            looked_over = self._dispatch(time.monotonic())
            waiting = self.fleet.waiting()
        # Straight on while the fleet is changing (it starts one renderer per job a turn).
        timeout = 0.0 if self._fleet_changed else CONTROLLER_WAIT_S
        if not waiting:
            self._wake.wait(timeout)
            self._wake.clear()
            ready: list[Any] = []
        else:  # one result a turn: the next turn's wait returns at once if more are in
            ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout, fetch_local=False)
        with self.lock:
            for ref in ready:
                slot = self.fleet.started_slot(ref)
                if slot is not None:
                    self._renderer_started(slot, ref)
                elif ref in self.fleet.in_flight:  # not written off with its renderer meanwhile
                    self._collect(ref)
            for decision in self.scheduler.drain_decisions():  # e.g. tasks blocked by a failure just recorded
                self._apply(decision, None, None)
            # The jobs whose attempts came in may be over; every job is looked at with the fleet.
            self.book.finish_over(None if looked_over else self._touched)
            self._touched.clear()

    def _dispatch(self, now: float) -> bool:
        """Keep the fleet in shape (when due) and fill every free renderer slot. Returns whether
        the fleet was looked over (every CONTROLLER_WAIT_S, and at once after it changed)."""
        self._maintain(now)
        look_over = self._fleet_changed or now - self._fleet_looked_at >= CONTROLLER_WAIT_S
        if look_over:
            self._fleet_changed, self._fleet_looked_at = False, now
            self._carry_out(self.fleet.scale(self.scheduler.demand(), self.book.models()))
            self._carry_out(self.fleet.overdue(self.book.timeouts(), self.book.stopping()))
        for batch in self.scheduler.next_batches():
            self._send(batch)
        for decision in self.scheduler.drain_decisions():  # taken while dispatching
            self._apply(decision, None, None)
        return look_over

    def _maintain(self, now: float) -> None:
        """Every few seconds: read the pools from the cluster's nodes, and size the launchable ones."""
        if now - self._last_pool_refresh >= POOL_REFRESH_S:
            self._refresh_pools()
            self._last_pool_refresh = now
        if self.autoscaling.node_types and now - self._last_autoscale >= AUTOSCALE_INTERVAL_S:
            self._last_autoscale = now
            try:
                self._autoscale(now)
            except Exception:  # scaling is advisory: it must never stop dispatch
                self.errors.append("autoscale: " + traceback.format_exc(limit=3))

    def _refresh_pools(self) -> None:
        from farm.cluster import discover_pools

        capacities = discover_pools()
        for cap in capacities:
            self.scheduler.add_pool(cap.pool)
        for node_type in self.autoscaling.node_types:  # pools the autoscaler can start: their work waits queued
            self.scheduler.add_pool(node_type.pool)
        self.fleet.set_capacity(capacities)
        self._fleet_changed = True

    def _autoscale(self, now: float) -> None:
        """Size each launchable pool for the backlog (and the tightest deadline of the running
        jobs), release the idle renderers of pools scaled down, and hand the sizes to Ray's
        autoscaler as a standing request."""
        from ray.autoscaler.sdk import request_resources

        deadlines, some_without = self.book.deadlines(datetime.now(UTC))
        # Queued work goes where the plan routes it; running work counts for the pool running it.
        self.autoscaling.update(
            self.fleet.capacity,
            now,
            self.fleet.running_by_pool(),
            self.scheduler.backlog_by_needs(in_flight=False),
            deadlines,
            some_without,
            self.fleet.busy_pools(),
        )
        for pool, keep in self.autoscaling.scaled_down():
            self._carry_out(self.fleet.release_idle(pool, keep))
        bundles = self.autoscaling.new_request()
        if bundles is not None:
            request_resources(bundles=bundles)  # replaces the previous request; [] withdraws it
            self.autoscaling.requested = bundles

    def _metrics_snapshot(self) -> FarmSnapshot:
        """What the gauges show at a scrape: running jobs, jobs finished within the TTL, pools."""
        with self.lock:
            jobs, expired = self.book.shown(FINISHED_JOB_TTL_S)
            for job_id in expired:
                self.metrics.forget_job(job_id)
            return farm_snapshot(jobs, self.fleet, self.autoscaling, datetime.now(UTC))


def get_or_start_controller(catalog_location: str | None, metrics_address: str | None = None):
    """The cluster's controller actor, started (detached, restarted by Ray if it dies) if absent,
    with the catalog at ``catalog_location`` (None: the head node's FARM_CATALOG, else
    ~/farm-data/catalog there). A running one keeps the catalog it has: the cluster
    has one catalog, and clients go through the controller to it (``ping()["catalog"]`` says where).
    ``metrics_address`` is where a newly started one serves its metrics (None: the configured one)."""
    import ray

    from farm.config import metrics_address as configured_metrics_address

    actor: Any = (
        ray.remote(Controller)
        .options(
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
        )
        .remote(catalog_location, metrics_address if metrics_address is not None else configured_metrics_address())
    )
    ray.get(actor.ping.remote())  # started and restored: ready for calls
    return actor
