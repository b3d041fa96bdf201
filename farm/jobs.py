"""The jobs a controller runs: taken from the catalog, followed to their end, recorded there.

No Ray. The controller keeps one ``JobBook``; it hands the scheduler each admitted job's tasks,
answers progress, and writes each job's lifecycle events (``JobEvent``) to the catalog, whose last
event is the job's state. Times come from an injected monotonic clock.

Policy:
- a job is admitted with the tasks not yet rendered into its output: tasks the catalog has done
  are skipped, clips finished but never catalogued (the writer died between the two) are adopted,
  and a task another running job renders into the same output is left to that job;
- a job with nothing left to render is finished at once;
- a controller restarted by Ray in the same cluster (same Ray session) admits again every job
  whose last event says this session admitted it; a job of a cluster that is gone waits for a
  re-submit;
- cancel stops dispatch at once; the job's running attempts get ``CANCEL_GRACE_S`` before their
  renderers are stopped;
- a job whose model cannot load fails as a whole (``JobEvent.FAILED``, its last event);
- a job is over when the scheduler has nothing queued or in flight for it (``FINISHED`` or
  ``CANCELLED``); its final progress stays answerable, for the ``FINISHED_JOBS_KEPT`` latest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from farm.catalog import AttemptWriter, Catalog
from farm.config import CANCEL_GRACE_S, FINISHED_JOBS_KEPT
from farm.records import JobRecord, attempt_row
from farm.scheduler import Decision, Dispatch, JobLimits, Outcome, Progress, Scheduler
from farm.storage import OutputTarget, Sink, StorageOptions, open_sink
from farm.task import AttemptStatus, FailureKind, JobEvent, JobState, ModelRef, Result, Task


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int
    waiting_for_pool: int
    state: JobState  # running | cancelling | finished | cancelled | failed
    elapsed_s: float
    eta_s: float | None
    renderers: int
    blocked: int = 0  # of failed: never attempted, a task they depend on failed
    waiting: int = 0  # for the tasks they depend on


@dataclass
class RunningJob:
    record: JobRecord
    target: OutputTarget
    model: ModelRef
    writer: AttemptWriter
    started: float
    skipped: int  # tasks already done (or being rendered for another job) when the controller took the job
    todo: set[str] = field(default_factory=set)  # task ids this job renders itself
    cancel_at: float | None = None  # when its running attempts' renderers are stopped
    failure: str = ""  # why the job failed as a whole (its model did not load)


def job_state(p: Progress, failure: str = "") -> JobState:
    """A running job's state from its scheduler progress; ``failure``: it failed as a whole."""
    if not p.cancelled:
        return JobState.FINISHED if p.finished else JobState.RUNNING
    if not p.finished:
        return JobState.CANCELLING
    return JobState.FAILED if failure else JobState.CANCELLED


def attempt_result(task_id: str, attempt: int, status: AttemptStatus, error: str, kind: FailureKind) -> Result:
    """The result of an attempt that ended without its renderer saying so (lost, timed out, given up)."""
    now = time.time()
    return Result(task_id, attempt, status, error=error, started_at=now, finished_at=now, error_kind=kind)


def committed_result(sink: Sink, task: Task) -> Result | None:
    """The result of ``task``'s clip as its commit marker in ``sink`` records it, if the clip is
    there and is the one the marker names; None if it was never committed."""
    from farm.render import result_from_record

    record = sink.get_json(f"{task.task_id}.json")
    if not record or record.get("task_id") != task.task_id:
        return None
    result = result_from_record(record)
    return result if result.succeeded and sink.matches(f"{task.task_id}.mp4", result.sha256) else None


def adopt_finished_outputs(catalog: Catalog, job_id: str, target: OutputTarget, tasks: list[Task]) -> set[str]:
    """Catalog clips whose commit marker is in the output but whose row never reached the catalog
    (the writer died between the two), instead of rendering them again. Also aborts uploads a
    killed renderer left half-done for the others."""
    sink = open_sink(target)
    adopted: set[str] = set()
    with catalog.writer(job_id) as writer:
        for task in tasks:
            result = committed_result(sink, task)
            if result is not None:
                writer.add(attempt_row(task, result, target.uri, final=True, recovered=True))
                adopted.add(task.task_id)
    pending = {t.task_id for t in tasks} - adopted
    sink.abort_incomplete({f"{t}{suffix}" for t in pending for suffix in (".mp4", ".jpg", ".json")})
    return adopted


def job_target(record: JobRecord) -> OutputTarget:
    return OutputTarget(record.output, StorageOptions(**json.loads(record.storage_json or "{}")))


class JobBook:
    """Running jobs and the latest finished ones' final progress (see the module's policy).
    ``renderers_of(model identity)``: the loaded renderers a job's progress reports."""

    def __init__(
        self,
        catalog: Catalog,
        scheduler: Scheduler,
        session: str,
        renderers_of: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.scheduler = scheduler
        self.session = session
        self.renderers_of = renderers_of
        self.clock = clock
        self.jobs: dict[str, RunningJob] = {}
        self.finished: dict[str, JobProgress] = {}
        self.finished_at: dict[str, tuple[JobRecord, float]] = {}  # job → (record, when it finished)

    def restore(self) -> tuple[list[str], list[str]]:
        """Admit again every job this session's controller had admitted and not finished.
        Returns the restored job ids, and an error line for each job that could not be."""
        restored, errors = [], []
        for record in self.catalog.jobs():
            events = self.catalog.events(record.job_id)
            if not events or events[-1]["event"] != JobEvent.ADMITTED or events[-1]["detail"] != self.session:
                continue
            try:
                self.admit(record)
                restored.append(record.job_id)
            except Exception as exc:  # one bad job must not keep the controller down
                errors.append(f"restore {record.job_id}: {exc}")
        return restored, errors

    def admit(self, record: JobRecord) -> JobProgress:
        """Take a job the catalog has: its progress (finished at once if nothing is left to render)."""
        tasks = self.catalog.tasks(record.job_id)
        target = job_target(record)
        # Done and verified: a done task whose clip is missing or changed gets an invalidated row and renders again.
        done = self.catalog.resume_done(record.job_id, tasks, target)
        todo = [t for t in tasks if t.task_id not in done]
        adopted = adopt_finished_outputs(self.catalog, record.job_id, target, todo) if todo else set()
        # A task another running job renders into the same output is rendered once, for that job.
        busy = {t for j in self.jobs.values() if j.target.uri == target.uri for t in j.todo}
        elsewhere = {t.task_id for t in todo if t.task_id in busy}  # its tasks may wait for these
        todo = [t for t in todo if t.task_id not in adopted and t.task_id not in busy]
        if not todo:
            self.catalog.record_event(record.job_id, JobEvent.FINISHED, "nothing to render")
            n = len(tasks)
            self.finished[record.job_id] = JobProgress(record.job_id, n, n, 0, 0, 0, 0, JobState.FINISHED, 0.0, 0.0, 0)
            return self.finished[record.job_id]
        model = tasks[0].model
        limits = JobLimits(max_attempts=record.max_attempts)
        self.scheduler.add_job(record.job_id, todo, record.priority, limits, model.identity, elsewhere)
        self.jobs[record.job_id] = RunningJob(
            record,
            target,
            model,
            self.catalog.writer(record.job_id),
            self.clock(),
            len(tasks) - len(todo),
            {t.task_id for t in todo},
        )
        self.catalog.record_event(record.job_id, JobEvent.ADMITTED, self.session)
        return self.live_progress(record.job_id)

    def progress(self, job_id: str) -> JobProgress | None:
        """A running job's progress now, or a finished one's final progress (None: not known)."""
        return self.live_progress(job_id) if job_id in self.jobs else self.finished.get(job_id)

    def live_progress(self, job_id: str) -> JobProgress:
        """The progress of a job this book runs."""
        job = self.jobs[job_id]
        p = self.scheduler.progress(job_id)
        elapsed = self.clock() - job.started
        ended = p.succeeded + p.failed
        eta = elapsed / ended * (p.total - ended) if ended else None
        return JobProgress(
            job_id,
            p.total + job.skipped,
            p.succeeded + job.skipped,
            p.failed,
            p.in_flight,
            p.queued,
            self.scheduler.waiting_without_pool(job_id),
            job_state(p, job.failure),
            elapsed,
            eta,
            self.renderers_of(job.model.identity),
            p.blocked,
            p.waiting,
        )

    def cancel(self, job_id: str) -> JobProgress | None:
        job = self.jobs.get(job_id)
        if job is not None and job.cancel_at is None:
            job.cancel_at = self.clock() + CANCEL_GRACE_S
            self.scheduler.cancel(job_id)
        return self.progress(job_id)

    def record_attempt(
        self, decision: Decision, d: Dispatch | None, result: Result | None
    ) -> tuple[str, Result] | None:
        """Write an attempt the scheduler decided on (``d``: the dispatch it was, if any; ``result``:
        what its renderer said, if it said anything) to its job's catalog rows. Returns the job's
        model spec and the result written, or None for a job that is no longer running."""
        job = self.jobs.get(decision.job_id)
        task = d.task if d else decision.task
        if job is None or task is None:
            return None
        if result is None:  # a decision without an attempt result: interrupted, poison task, stuck job
            status = {
                Outcome.FAILED: AttemptStatus.FAILED,
                Outcome.DROPPED: AttemptStatus.CANCELLED,
                Outcome.BLOCKED: AttemptStatus.BLOCKED,
            }.get(decision.outcome, AttemptStatus.INTERRUPTED)
            # With a dispatch its renderer died under it; without one the scheduler gave up on the
            # job's renderers after repeated failures, or a task it depends on failed.
            kind = FailureKind.RENDERER_LOST if d else FailureKind.BAD_RENDERER
            if decision.outcome is Outcome.BLOCKED:
                kind = FailureKind.PARENT_FAILED
            result = attempt_result(
                decision.task_id, d.attempt if d else decision.attempt, status, decision.reason, kind
            )
        elif decision.outcome is Outcome.DROPPED and not result.succeeded:
            result = replace(result, status=AttemptStatus.CANCELLED)  # it failed because its job was cancelled
        job.writer.add(attempt_row(task, result, job.target.uri, final=decision.final))
        return job.model.spec, result

    def fail_model(self, model: ModelRef, reason: str) -> None:
        """Every running job of a model that cannot load fails as a whole; its work stops now."""
        for job_id, job in self.jobs.items():
            if job.model.identity == model.identity and not job.failure:
                self.scheduler.cancel(job_id)
                self.catalog.record_event(job_id, JobEvent.FAILED, reason)
                job.failure, job.cancel_at = reason, self.clock()

    def finish_over(self, job_ids: Iterable[str] | None = None) -> list[str]:
        """Flush what is due, and end every job that is over, of ``job_ids`` (None: of every running
        job; the controller names the jobs whose attempts just came in, and looks at all of them
        only every so often). Returns the ended job ids."""
        ended = []
        for job_id in list(self.jobs if job_ids is None else job_ids):
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.writer.maybe_flush()
            p = self.scheduler.progress(job_id)
            if not p.finished:
                continue
            job.writer.flush()
            self.finished[job_id] = self.live_progress(job_id)
            if not job.failure:  # a failed job's event was written when it failed: the last event is its state
                event = JobEvent.CANCELLED if p.cancelled else JobEvent.FINISHED
                self.catalog.record_event(job_id, event, f"{p.succeeded} succeeded, {p.failed} failed")
            self.finished_at[job_id] = (job.record, self.clock())
            while len(self.finished) > FINISHED_JOBS_KEPT:
                self.finished.pop(next(iter(self.finished)))
            self.scheduler.forget(job_id)
            del self.jobs[job_id]
            ended.append(job_id)
        return ended

    def models(self) -> dict[str, ModelRef]:
        """Model identity → the ModelRef of the first running job that needs it."""
        models: dict[str, ModelRef] = {}
        for job in self.jobs.values():
            models.setdefault(job.model.identity, job.model)
        return models

    def timeouts(self) -> dict[str, float]:
        """Job id → how long one attempt of it may run."""
        return {job_id: job.record.timeout_s for job_id, job in self.jobs.items()}

    def stopping(self) -> list[str]:
        """Jobs whose running attempts are to be stopped now (cancelled, grace over; or failed)."""
        now = self.clock()
        return [job_id for job_id, job in self.jobs.items() if job.cancel_at is not None and now >= job.cancel_at]

    def deadlines(self, wall_now: datetime) -> tuple[list[float], bool]:
        """Seconds to each live (not cancelled) job's deadline, and whether some live job has none."""
        live = [j for j in self.jobs.values() if j.cancel_at is None]
        deadlines = [
            (j.record.deadline_at - wall_now).total_seconds() for j in live if j.record.deadline_at is not None
        ]
        return deadlines, len(deadlines) < len(live)

    def shown(self, ttl_s: float) -> tuple[list[tuple[JobRecord, JobProgress]], list[str]]:
        """The jobs metrics show: running ones, and finished ones for ``ttl_s`` after they ended.
        Also returns the finished jobs just past that (no longer shown)."""
        now = self.clock()
        expired = [job_id for job_id, (_, at) in self.finished_at.items() if now - at > ttl_s]
        for job_id in expired:
            del self.finished_at[job_id]
        shown = [(job.record, self.live_progress(job_id)) for job_id, job in self.jobs.items()]
        shown += [
            (record, self.finished[job_id])
            for job_id, (record, _) in self.finished_at.items()
            if job_id in self.finished and job_id not in self.jobs
        ]
        return shown, expired

    def flush(self) -> None:
        for job in self.jobs.values():
            job.writer.flush()
