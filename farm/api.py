"""What the CLI and Python users call: plan, submit, jobs, status, results.

Validation happens before anything runs: a bad manifest renders nothing. Submitting again is
always safe: tasks already done into the same output are skipped.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from farm import __version__
from farm.catalog import Catalog, CompactionReport, JobRecord, JobStatus, ResultFilter, attempt_row
from farm.config import catalog_location
from farm.controller import JobController, JobOutcome, JobProgress
from farm.manifest import ManifestFile, expand, load_manifest
from farm.render import TestFaults
from farm.storage import open_sink
from farm.task import Task


@dataclass(frozen=True)
class Plan:
    manifest: ManifestFile
    tasks: list[Task]
    expanded: int  # before identical tasks collapsed
    done: dict[str, str]  # task_id → output uri, for tasks already rendered into this output

    @property
    def to_render(self) -> list[Task]:
        return [t for t in self.tasks if t.task_id not in self.done]


@dataclass(frozen=True)
class SubmitOutcome:
    job_id: str
    plan: Plan
    catalog_root: str
    output: str
    recovered: int  # finished clips found in the output but missing from the catalog
    run: JobOutcome | None = None  # None when there was nothing to render
    renderers: list = field(default_factory=list)  # RendererInfo of each renderer used

    @property
    def failed(self) -> int:
        return self.run.failed if self.run else 0


def _catalog(root: str | Path | None) -> Catalog:
    return Catalog(root or catalog_location())


def validate(manifest_path: str | Path) -> tuple[ManifestFile, int]:
    """Load and expand a manifest; returns it and its task count. Raises ManifestError."""
    mf = load_manifest(manifest_path)
    return mf, len(expand(mf).tasks)


def plan(manifest_path: str | Path, output: str | None = None, catalog_root: str | Path | None = None) -> Plan:
    mf = load_manifest(manifest_path, output_override=output)
    expansion = expand(mf)
    sink = open_sink(mf.target)
    if hasattr(sink, "check_writable"):  # an unreachable bucket is an input error, found before rendering
        sink.check_writable()
    done = _catalog(catalog_root).done([t.task_id for t in expansion.tasks], mf.output)
    return Plan(mf, expansion.tasks, expansion.expanded, done)


def _new_job_id(campaign: str) -> str:
    return f"{campaign}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def submit(
    manifest_path: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    output: str | None = None,
    catalog_root: str | Path | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_plan: Callable[[Plan, str], None] | None = None,
    test_faults: TestFaults | None = None,
) -> SubmitOutcome:
    """Render every task of a manifest not yet done; blocks until the job ends."""
    from farm import cluster

    if test_faults is None and os.environ.get("FARM_TEST_FAULTS"):
        test_faults = TestFaults(**json.loads(os.environ["FARM_TEST_FAULTS"]))

    job_plan = plan(manifest_path, output, catalog_root)
    mf = job_plan.manifest
    catalog = _catalog(catalog_root)
    # Reach the cluster before recording anything: a wrong --address leaves no half-started job.
    info = cluster.connect(address) if job_plan.to_render else None
    job_id = _new_job_id(mf.manifest.campaign)
    catalog.record_job(
        JobRecord(
            job_id=job_id,
            campaign=mf.manifest.campaign,
            submitted_at=datetime.now(UTC),
            user=getpass.getuser(),
            host=socket.gethostname(),
            manifest_path=str(Path(manifest_path).resolve()),
            manifest_sha256=hashlib.sha256(mf.text.encode()).hexdigest(),
            manifest_yaml=mf.text,
            model=mf.model.spec,
            output=mf.output,
            max_attempts=mf.max_attempts,
            task_ids=tuple(t.task_id for t in job_plan.tasks),
            farm_version=__version__,
        )
    )
    recovered = _adopt_finished_outputs(catalog, job_id, job_plan)
    todo = [t for t in job_plan.to_render if t.task_id not in recovered]
    if on_plan:
        on_plan(job_plan, job_id)
    if not todo or info is None:
        if info is not None and info.embedded:
            cluster.disconnect(info)
        catalog.record_event(job_id, "finished", "nothing to render")
        return SubmitOutcome(job_id, job_plan, str(catalog.root), mf.output, len(recovered))

    handles: list = []
    try:
        handles = cluster.start_renderers(mf.model, cluster.plan_slots(info, workers), test_faults)
        controller = JobController(job_id, todo, handles, catalog, mf.target, mf.max_attempts, on_progress)
        outcome = controller.run()
    except BaseException as exc:  # Ctrl-C, lost cluster: say so in the catalog, keep what is done
        catalog.record_event(job_id, "interrupted", type(exc).__name__)
        raise
    finally:
        if handles and not info.embedded:
            cluster.stop_renderers(handles)
        if info.embedded:
            cluster.disconnect(info)
    catalog.record_event(job_id, "finished", f"{outcome.succeeded} succeeded, {outcome.failed} failed")
    return SubmitOutcome(job_id, job_plan, str(catalog.root), mf.output, len(recovered), outcome,
                         [h.info for h in handles])


def _adopt_finished_outputs(catalog: Catalog, job_id: str, job_plan: Plan) -> set[str]:
    """Catalog clips whose commit marker is in the output but whose row never reached the
    catalog (the driver died between the two), instead of rendering them again."""
    from farm.render import result_from_record

    sink = open_sink(job_plan.manifest.target)
    adopted: set[str] = set()
    with catalog.writer(job_id) as writer:
        for task in job_plan.to_render:
            record = sink.get_json(f"{task.task_id}.json")
            if not record or record.get("task_id") != task.task_id:
                continue
            result = result_from_record(record)
            if result.succeeded and sink.matches(f"{task.task_id}.mp4", result.sha256):
                writer.add(attempt_row(task, result, job_plan.manifest.output, final=True, recovered=True))
                adopted.add(task.task_id)
    # What a killed renderer left half-written for the tasks about to render again.
    pending = {t.task_id for t in job_plan.to_render} - adopted
    sink.abort_incomplete({f"{t}{suffix}" for t in pending for suffix in (".mp4", ".jpg", ".json")})
    return adopted


def jobs(catalog_root: str | Path | None = None) -> list[JobStatus]:
    catalog = _catalog(catalog_root)
    return catalog.statuses(catalog.jobs())


def status(job_id: str, catalog_root: str | Path | None = None) -> JobStatus:
    catalog = _catalog(catalog_root)
    return catalog.status(catalog.job(job_id))


def results(
    job_id: str, keep: ResultFilter | None = None, catalog_root: str | Path | None = None
) -> tuple[JobRecord, list[dict]]:
    catalog = _catalog(catalog_root)
    job = catalog.job(job_id)
    return job, catalog.results(job, keep)


def compact(job_id: str | None = None, catalog_root: str | Path | None = None) -> CompactionReport:
    catalog = _catalog(catalog_root)
    if job_id:
        job_id = catalog.job(job_id).job_id
    return catalog.compact(job_id)
