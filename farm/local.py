"""An embedded submit's farm, with Ray: own it, join it, follow a job on it, take it over.

``farm/embedded.py`` keeps the files and locks that say who owns a local catalog's farm; this
module runs the farm around them (policy there). Also the client's ways to follow a job on a
controller (``follow``), shared with ``--address`` submits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.catalog import Catalog, RunSummary
from farm.config import EMBEDDED_JOIN_WAIT_S, EMBEDDED_POLL_S, FOLLOW_POLL_S
from farm.controller import JobProgress, get_or_start_controller
from farm.embedded import FarmInfo, Host, Membership, OwnerGone, Role, is_final
from farm.errors import FarmError
from farm.interrupts import raise_if_interrupted
from farm.records import JobRecord
from farm.task import JobEvent, JobState, StorageKind, Task

Notice = Callable[[str], None]
# A job whose tasks were left to another running job is admitted again when that job ends; this
# bounds how often (each time, something else took its tasks again).
MAX_READMISSIONS = 20


def call(ref: Any, timeout: float | None = None) -> Any:
    """ray.get, with a FarmError raised inside the controller re-raised here as itself."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as exc:
        if isinstance(exc.cause, FarmError):
            raise exc.cause from None
        raise


def follow(
    controller: Any,
    progress: JobProgress,
    on_progress: Callable[[JobProgress], None] | None = None,
    poll_s: float = FOLLOW_POLL_S,
) -> JobProgress:
    """Poll a job's progress until it ends."""
    while progress.state in ("running", "cancelling"):
        if on_progress:
            on_progress(progress)
        time.sleep(poll_s)
        raise_if_interrupted()
        job_id = progress.job_id
        progress = call(controller.progress.remote(job_id)) or progress_from_catalog(controller, job_id)
    if on_progress:
        on_progress(progress)
    return progress


def progress_from_catalog(controller: Any, job_id: str) -> JobProgress:
    """A job the controller no longer holds (restarted by Ray after the job ended, or the job was
    dropped): what the catalog says of it."""
    status, live = call(controller.job_status.remote(job_id))
    if live is not None:
        return live
    c = status.counts
    failed = c.get("failed", 0) + c.get("blocked", 0)
    state = JobState.INTERRUPTED if status.state in (JobState.RUNNING, JobState.SUBMITTED) else status.state
    return JobProgress(
        job_id, status.job.task_count, c.get("succeeded", 0), failed, 0, c.get("pending", 0), 0, state,
        0.0, None, 0,
    )  # fmt: skip


def stop_controller(controller: Any) -> None:
    """Flush the controller's catalog batches before the embedded Ray goes away with it."""
    import ray

    # If it fails the cluster is going down anyway; commit markers recover what was finished.
    with contextlib.suppress(Exception):
        ray.get(controller.shutdown.remote(), timeout=30)


class ControllerCalls:
    """The owner's controller and catalog, as the calls ``embedded.Host`` makes (``FarmCalls``)."""

    def __init__(self, controller: Any, catalog: Catalog) -> None:
        self.controller = controller
        self.catalog = catalog

    def submit(self, job_id: str) -> JobProgress:
        progress: JobProgress = call(self.controller.submit.remote(job_id))
        return progress

    def cancel(self, job_id: str) -> Any:
        return call(self.controller.cancel.remote(job_id))

    def renderer_stats(self) -> list[dict]:
        stats: list[dict] = call(self.controller.renderer_stats.remote())
        return stats

    def live_jobs(self) -> set[str]:
        return set(call(self.controller.ping.remote())["jobs"])

    def run_to_end(
        self, job_id: str, progress: JobProgress, on_progress: Callable[[JobProgress], None] | None
    ) -> JobProgress:
        """Follow a job until it ends. One that ended with tasks left to another running job (a
        task two jobs share is rendered once, for the job that had it first) waits for that job,
        then is admitted again: it ends when its own tasks are done or failed."""
        for _ in range(MAX_READMISSIONS):
            progress = follow(self.controller, progress, on_progress)
            if progress.state != JobState.FINISHED or not self._pending(job_id):
                break
            others = self.live_jobs() - {job_id}
            while others & self.live_jobs():
                if on_progress:
                    on_progress(progress)
                time.sleep(EMBEDDED_POLL_S)
                raise_if_interrupted()
            progress = self.submit(job_id)
        return progress

    def _pending(self, job_id: str) -> int:
        return self.catalog.status(self.catalog.job(job_id)).counts.get("pending", 0)


@dataclass(frozen=True)
class LocalRun:
    """How a job on the embedded farm ended, and this submit's part in the farm."""

    progress: JobProgress
    summary: RunSummary
    renderers: list[dict]
    role: Role


def run_embedded(
    record: JobRecord,
    tasks: list[Task],
    catalog: Catalog,
    workers: int | None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_notice: Notice | None = None,
) -> LocalRun:
    """Run a job on the local catalog's embedded farm: own it (start it, and keep it up for the jobs
    other submits hand to it), or join the running one and follow the job there; take over when
    the owner dies. The job record and task list are written here, once."""
    notice = on_notice or (lambda _: None)
    membership = Membership(catalog.base)
    written = False
    try:
        while True:
            role = membership.claim(EMBEDDED_JOIN_WAIT_S, on_wait=lambda farm: notice(_waiting(farm)))
            if not written and role is Role.FOLLOWER:
                _write_job(catalog, record, tasks)
                written = True
            if role is Role.OWNER:
                return _own(membership, record, tasks if not written else None, catalog, workers, on_progress, notice)
            membership.hand(record.job_id)
            farm = membership.farm
            notice(f"joined the embedded farm of {farm.describe() if farm else '?'}: job {record.job_id} runs there")
            try:
                return _follow_handed(membership, record, catalog, on_progress)
            except OwnerGone:
                notice(f"the embedded farm of {farm.describe() if farm else '?'} stopped: this submit takes it over")
    finally:
        membership.close()


def _waiting(farm: FarmInfo | None) -> str:
    who = f"of {farm.describe()} " if farm else ""
    return f"waiting for the embedded farm {who}on this catalog to start (or to stop)…"


def _write_job(catalog: Catalog, record: JobRecord, tasks: list[Task]) -> None:
    catalog.record_tasks(record.job_id, tasks)
    catalog.record_job(record)


def run_job(
    record: JobRecord,
    tasks: list[Task],
    catalog: Catalog,
    workers: int | None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_notice: Notice | None = None,
) -> LocalRun:
    """Run a job on this machine (its record and task list are written here): on the caller's own
    Ray when this process is a Ray driver already; else on the catalog's embedded farm (owned or
    joined, see farm/embedded.py), or on a farm of its own for an S3 catalog (not coordinated:
    no lock is reliable there)."""
    import ray

    if ray.is_initialized() or StorageKind.of(catalog.location) is StorageKind.S3:
        return _own(None, record, tasks, catalog, workers, on_progress, on_notice or (lambda _: None))
    return run_embedded(record, tasks, catalog, workers, on_progress, on_notice)


def _own(
    membership: Membership | None,
    record: JobRecord,
    tasks: list[Task] | None,
    catalog: Catalog,
    workers: int | None,
    on_progress: Callable[[JobProgress], None] | None,
    notice: Notice,
) -> LocalRun:
    """Start the farm, run this job on it (``tasks`` None: written already, as a follower), serve
    the jobs handed to it, and stop it once none is left. Without ``membership`` the farm serves
    no other submit (an S3 catalog, or the caller's own Ray, left running)."""
    from farm import cluster

    info = cluster.connect(None, num_cpus=workers)
    controller = None
    try:
        controller = get_or_start_controller(catalog.location)
        calls = ControllerCalls(controller, catalog)
        if membership:
            membership.detach(record.job_id)  # a follower that took over follows its job here, not served
            _pick_up(membership, calls, catalog, record.job_id, notice)
        if tasks is not None:
            _write_job(catalog, record, tasks)
        progress = calls.submit(record.job_id)
        if membership:
            membership.publish(info.address, call(controller.ping.remote())["session"])
            host = Host(membership, calls, skip={record.job_id}).start()
        started = time.monotonic()
        progress = calls.run_to_end(record.job_id, progress, on_progress)
        summary = catalog.run_summary(record.job_id, time.monotonic() - started, progress.state)
        renderers = calls.renderer_stats()
        if membership:
            _linger(membership, host, calls, record.job_id, notice)
        if info.embedded:
            stop_controller(controller)
        if membership:
            membership.end_stop()
        return LocalRun(progress, summary, renderers, Role.OWNER)
    except BaseException:  # Ctrl-C, a lost Ray: the job goes down with this process; keep what is done, say so
        if controller is not None and info.embedded:
            stop_controller(controller)
            with contextlib.suppress(Exception):
                catalog.record_event(record.job_id, JobEvent.INTERRUPTED, "the submitting client stopped")
        raise
    finally:
        cluster.disconnect(info)


def _pick_up(membership: Membership, calls: ControllerCalls, catalog: Catalog, own: str, notice: Notice) -> None:
    """The jobs a farm that did not stop (its owner died) had admitted: resumed when this process
    was following the catalog's farm (it takes it over), else recorded as interrupted (submit
    again to resume).
    Jobs handed to it by followers are served again either way (``Host``)."""
    previous = membership.previous
    if previous is None or not previous.session:
        return
    handed = set(membership.handed_jobs())
    held = [
        j.job_id
        for j in catalog.jobs()
        if j.job_id != own and j.job_id not in handed and _admitted_by(catalog, j.job_id, previous.session)
    ]
    took_over = membership.farm is not None  # this process followed the catalog's farm when its owner died
    for job_id in held:
        if not took_over:
            detail = f"the embedded farm running it ({previous.describe()}) stopped"
            catalog.record_event(job_id, JobEvent.INTERRUPTED, detail)
            continue
        try:
            calls.submit(job_id)
        except FarmError as exc:  # one job that cannot resume must not stop the others
            notice(f"could not resume job {job_id}: {exc}")
    if took_over and held:
        notice(f"resumed {len(held)} job(s) of the stopped farm: {', '.join(held)}")


def _admitted_by(catalog: Catalog, job_id: str, session: str) -> bool:
    events = catalog.events(job_id)
    return bool(events) and events[-1]["event"] == JobEvent.ADMITTED and events[-1]["detail"] == session


def _linger(membership: Membership, host: Host, calls: ControllerCalls, own: str, notice: Notice) -> None:
    """Keep the farm up while a job handed to it (or resumed by it) runs or a follower is attached."""
    told = False
    while True:
        live = calls.live_jobs() - {own}
        if not host.busy() and not live and membership.begin_stop():
            if not host.busy() and not calls.live_jobs():  # nothing handed over by a follower that just died
                break
        elif not told:
            notice(f"job {own} ended; keeping the embedded farm up for the jobs other farm submits handed to it")
            told = True
        time.sleep(EMBEDDED_POLL_S)
        raise_if_interrupted()
    host.stop()


def _follow_handed(
    membership: Membership, record: JobRecord, catalog: Catalog, on_progress: Callable[[JobProgress], None] | None
) -> LocalRun:
    """Follow a handed job through the progress the owner writes, until it ends. Raises OwnerGone
    when the owner dies first (this process then holds the catalog's lock)."""
    started = time.monotonic()
    try:
        while True:
            data = membership.progress(record.job_id) or {}
            if "error" in data:
                membership.detach(record.job_id)
                raise FarmError(str(data["error"]))
            if "progress" in data:
                progress = JobProgress(**{**data["progress"], "state": JobState(data["progress"]["state"])})
                if on_progress:
                    on_progress(progress)
                if data.get("final") and is_final(progress.state):
                    break
            if not membership.owner_alive():
                raise OwnerGone
            time.sleep(EMBEDDED_POLL_S)
            raise_if_interrupted()
    except KeyboardInterrupt:  # stop this job, not the farm: the owner cancels it
        membership.request_cancel(record.job_id)
        raise
    summary = catalog.run_summary(record.job_id, time.monotonic() - started, progress.state)
    membership.detach(record.job_id)
    return LocalRun(progress, summary, list(data.get("renderers", [])), Role.FOLLOWER)
