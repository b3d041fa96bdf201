"""Runs one job's tasks on renderer actors: the scheduler's decisions carried out with Ray.

Keeps a bounded number of tasks in flight per renderer, collects results as they finish,
retries failures with backoff up to the job's limit, requeues the work of a renderer that died,
and writes every attempt to the catalog in batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from farm.catalog import Catalog, attempt_row
from farm.cluster import RendererHandle
from farm.errors import ClusterError
from farm.scheduler import Outcome, Progress, Scheduler
from farm.storage import OutputTarget
from farm.task import AttemptStatus, Result, Task

# How long one wait for results may block, so progress and retries stay timely.
_WAIT_S = 0.5


@dataclass(frozen=True)
class JobProgress:
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int
    elapsed_s: float
    eta_s: float | None


@dataclass(frozen=True)
class JobOutcome:
    succeeded: int
    failed: int
    attempts: int
    elapsed_s: float
    busy_s: float  # sum over attempts of generate + encode + write time
    lost_renderers: int


def _progress(p: Progress, started: float) -> JobProgress:
    elapsed = time.monotonic() - started
    finished = p.succeeded + p.failed
    remaining = p.total - finished
    eta = elapsed / finished * remaining if finished else None
    return JobProgress(p.total, p.succeeded, p.failed, p.in_flight, p.queued, elapsed, eta)


class JobController:
    def __init__(
        self,
        job_id: str,
        tasks: list[Task],
        renderers: list[RendererHandle],
        catalog: Catalog,
        target: OutputTarget,
        max_attempts: int,
        on_progress: Callable[[JobProgress], None] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.job_id = job_id
        self.tasks = tasks
        self.renderers = {h.slot.name: h for h in renderers}
        self.catalog = catalog
        self.target = target
        self.on_progress = on_progress or (lambda _p: None)
        self.scheduler = scheduler or Scheduler(tasks, max_attempts)

    def run(self) -> JobOutcome:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        for slot in self.renderers:
            self.scheduler.add_slot(slot)
        in_flight: dict = {}  # ObjectRef → Dispatch
        started = time.monotonic()
        attempts = 0
        busy = 0.0
        lost = 0
        with self.catalog.writer(self.job_id) as writer:
            while not self.scheduler.finished:
                for d in self.scheduler.next_dispatches():
                    actor = self.renderers[d.slot].actor
                    in_flight[actor.render.remote(d.task, d.attempt, self.target)] = d
                if not in_flight:
                    if not self.scheduler.slots:
                        raise ClusterError("every renderer died; the job cannot go on",
                                           hint="re-submit to resume once the cluster is healthy")
                    time.sleep(min(_WAIT_S, self.scheduler.seconds_until_next_retry() or _WAIT_S))
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=_WAIT_S)
                if ready:  # take every result that is in, not just the first
                    ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
                for ref in ready:
                    if ref not in in_flight:
                        continue  # its renderer was already written off
                    d = in_flight.pop(ref)
                    try:
                        result: Result = ray.get(ref)
                    except RayActorError:
                        # The renderer is gone (node lost, OOM, killed): its tasks go back to the
                        # queue as interrupted, not failed.
                        lost += 1
                        self.scheduler.remove_slot(d.slot)
                        self.renderers.pop(d.slot, None)
                        for other in [r for r, o in in_flight.items() if o.slot == d.slot]:
                            in_flight.pop(other)
                        continue
                    except RayTaskError as exc:
                        result = Result(d.task.task_id, d.attempt, AttemptStatus.FAILED,
                                        error=str(exc).strip().splitlines()[-1][:2000],
                                        started_at=time.time(), finished_at=time.time())
                    attempts += 1
                    t = result.timings
                    busy += t.generate_s + t.encode_s + t.write_s
                    decision = self.scheduler.record(d.slot, d.task, result.succeeded, result.error)
                    writer.add(attempt_row(d.task, result, self.target.uri, final=decision.outcome != Outcome.RETRY))
                writer.maybe_flush()
                self.on_progress(_progress(self.scheduler.progress(), started))
        p = self.scheduler.progress()
        return JobOutcome(p.succeeded, p.failed, attempts, time.monotonic() - started, busy, lost)
