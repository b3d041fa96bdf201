"""What the CLI and Python users call: plan, submit, jobs, status, results.

Validation happens before anything runs: a bad manifest renders nothing. Submitting again is
always safe: tasks already done into the same output are skipped.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from farm import __version__
from farm.catalog import Catalog, CompactionReport, JobRecord, JobStatus, ResultFilter
from farm.config import catalog_location
from farm.controller import CONTROLLER_NAME, NAMESPACE, JobProgress, get_or_start_controller
from farm.errors import CatalogError, ClusterError, FarmError
from farm.manifest import ManifestFile, expand, load_manifest
from farm.render import TestFaults
from farm.storage import open_sink
from farm.task import Pool, Task


@dataclass(frozen=True)
class Plan:
    manifest: ManifestFile
    tasks: list[Task]
    expanded: int  # before identical tasks collapsed
    done: dict[str, str]  # task_id → output uri, for tasks already rendered into this output
    routes: dict[str, int]  # cheapest fitting pool → tasks to render that would go there first

    @property
    def to_render(self) -> list[Task]:
        return [t for t in self.tasks if t.task_id not in self.done]


@dataclass(frozen=True)
class RunSummary:
    """What one job did, read back from the catalog."""

    succeeded: int  # clips this job rendered
    failed: int  # tasks that ended failed
    attempts: int
    interrupted: int
    elapsed_s: float  # first attempt's start to last attempt's end (the whole wait if none ran)
    busy_s: float  # sum over attempts of generate + encode + write time
    state: str


@dataclass(frozen=True)
class SubmitOutcome:
    job_id: str
    plan: Plan
    catalog_root: str
    output: str
    recovered: int  # finished clips found in the output but missing from the catalog
    run: RunSummary | None = None  # None when there was nothing to render
    renderers: list = field(default_factory=list)  # per renderer: slot, pool, loads, load_s, pid

    @property
    def failed(self) -> int:
        return self.run.failed if self.run else 0


def _catalog(root: str | Path | None) -> Catalog:
    return Catalog(root or catalog_location())


def validate(manifest_path: str | Path) -> tuple[ManifestFile, int]:
    """Load and expand a manifest; returns it and its task count. Raises ManifestError."""
    mf = load_manifest(manifest_path)
    return mf, len(expand(mf).tasks)


def route(tasks: list[Task], pools: list[Pool]) -> dict[str, int]:
    """Cheapest fitting pool → task count. A task no pool can ever take is an input error."""
    counts: dict[str, int] = {}
    cache: dict = {}
    for task in tasks:
        if task.needs not in cache:
            fitting = sorted((p for p in pools if p.fits(task.needs)), key=lambda p: (p.cost_per_hour, p.name))
            cache[task.needs] = fitting[0].name if fitting else None
        name = cache[task.needs]
        if name is None:
            n = task.needs
            raise FarmError(
                f"task {task.task_id} ({task.source}) needs min_vram_gb={n.min_vram_gb:g}"
                + (f", gpu_type={n.gpu_type}" if n.gpu_type else "") + (f", pool={n.pool}" if n.pool else "")
                + " and no pool offers that (" + ", ".join(_describe(p) for p in pools) + ")",
                field="requirements",
                hint="lower the requirements or add nodes of such a pool to the cluster",
            )
        counts[name] = counts.get(name, 0) + 1
    return counts


def _describe(pool: Pool) -> str:
    vram = f"{pool.vram_gb:g} GB" if pool.vram_gb is not None else "no VRAM limit"
    return f"{pool.name}: {pool.gpu_type or 'CPU'}, {vram}, ${pool.cost_per_hour:g}/h"


def _pools_here(address: str | None) -> list[Pool]:
    """The pools a plan routes to: the cluster's when one is named, else this machine's."""
    if address:
        from farm import cluster

        info = cluster.connect(address)
        try:
            return [c.pool for c in cluster.discover_pools()]
        finally:
            cluster.disconnect(info)
    from farm.cluster import LOCAL_POOL

    return [Pool(LOCAL_POOL)]


def plan(
    manifest_path: str | Path,
    output: str | None = None,
    catalog_root: str | Path | None = None,
    address: str | None = None,
    pools: list[Pool] | None = None,
) -> Plan:
    mf = load_manifest(manifest_path, output_override=output)
    expansion = expand(mf)
    sink = open_sink(mf.target)
    if hasattr(sink, "check_writable"):  # an unreachable bucket is an input error, found before rendering
        sink.check_writable()
    done = _catalog(catalog_root).done([t.task_id for t in expansion.tasks], mf.output)
    to_render = [t for t in expansion.tasks if t.task_id not in done]
    routes = route(to_render, pools if pools is not None else _pools_here(address))
    return Plan(mf, expansion.tasks, expansion.expanded, done, routes)


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
    """Hand every task of a manifest not yet done to the cluster's controller and follow the job
    until it ends. ``workers`` sizes an embedded Ray (renderer slots on this machine)."""
    import ray

    from farm import cluster

    if test_faults is None and os.environ.get("FARM_TEST_FAULTS"):
        test_faults = TestFaults(**json.loads(os.environ["FARM_TEST_FAULTS"]))
    catalog = _catalog(catalog_root)
    mf = load_manifest(manifest_path, output_override=output)
    expand(mf)  # a bad manifest is reported before any Ray starts
    # Reach the cluster before recording anything: a wrong --address leaves no half-started job.
    info = cluster.connect(address, num_cpus=workers)
    try:
        job_plan = plan(manifest_path, output, catalog.location, pools=[c.pool for c in cluster.discover_pools()])
        controller = get_or_start_controller(catalog.location) if job_plan.to_render else None
        job_id = _new_job_id(mf.manifest.campaign)
        catalog.record_tasks(job_id, job_plan.tasks)
        catalog.record_job(_job_record(job_id, manifest_path, job_plan))
        if on_plan:
            on_plan(job_plan, job_id)
        if controller is None:
            catalog.record_event(job_id, "finished", "nothing to render")
            return SubmitOutcome(job_id, job_plan, catalog.location, mf.output, 0)
        started = time.monotonic()
        try:
            progress = ray.get(controller.submit.remote(job_id, test_faults))
            while progress.state in ("running", "cancelling"):
                if on_progress:
                    on_progress(progress)
                time.sleep(_POLL_S)
                progress = ray.get(controller.progress.remote(job_id))
            if on_progress:
                on_progress(progress)
        except BaseException:  # Ctrl-C, lost cluster: keep what is done, say so in the catalog
            if info.embedded:
                _stop_embedded(controller)
            catalog.record_event(job_id, "interrupted", "the submitting client stopped")
            raise
        renderers = ray.get(controller.renderer_stats.remote())
        if info.embedded:
            _stop_embedded(controller)
        summary = _summarize(catalog, job_id, time.monotonic() - started, progress.state)
        recovered = summary_recovered(catalog, job_id)
        return SubmitOutcome(job_id, job_plan, catalog.location, mf.output, recovered, summary, renderers)
    finally:
        if info.embedded:
            cluster.disconnect(info)


_POLL_S = 0.25


def _stop_embedded(controller) -> None:
    """Flush the controller's catalog batches before the embedded Ray goes away with it."""
    import ray

    # If it fails the cluster is going down anyway; commit markers recover what was finished.
    with contextlib.suppress(Exception):
        ray.get(controller.shutdown.remote(), timeout=30)


def _job_record(job_id: str, manifest_path: str | Path, job_plan: Plan) -> JobRecord:
    mf = job_plan.manifest
    options = {k: v for k, v in asdict(mf.target.options).items() if v is not None}
    return JobRecord(
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
        priority=mf.manifest.priority,
        timeout_s=mf.manifest.timeout_s,
        storage_json=json.dumps(options),
    )


def _summarize(catalog: Catalog, job_id: str, elapsed_s: float, state: str) -> RunSummary:
    rows = catalog.attempts(job_id, columns=["status", "final", "recovered", "generate_s", "encode_s",
                                              "write_s", "started_at", "finished_at"]).to_pylist()
    made = [r for r in rows if not r["recovered"]]
    if made:  # the rendering makespan: first attempt's start to last attempt's end
        elapsed_s = (max(r["finished_at"] for r in made) - min(r["started_at"] for r in made)).total_seconds()
    return RunSummary(
        succeeded=sum(r["status"] == "succeeded" for r in made),
        failed=sum(r["status"] == "failed" and r["final"] for r in made),
        attempts=sum(r["status"] in ("succeeded", "failed") for r in made),
        interrupted=sum(r["status"] == "interrupted" for r in made),
        elapsed_s=elapsed_s,
        busy_s=sum((r["generate_s"] or 0) + (r["encode_s"] or 0) + (r["write_s"] or 0) for r in made),
        state=state,
    )


def summary_recovered(catalog: Catalog, job_id: str) -> int:
    rows = catalog.attempts(job_id, columns=["recovered"]).column("recovered").to_pylist()
    return sum(bool(r) for r in rows)


def cancel(job_id: str, address: str | None = None, catalog_root: str | Path | None = None) -> dict:
    """Stop a running job: no new dispatch, running attempts stopped within seconds."""
    import ray

    from farm import cluster

    catalog = _catalog(catalog_root)
    job = catalog.job(job_id)
    if not address:
        raise FarmError("cancel needs the cluster the job runs on", field="--address",
                        hint="give --address HOST:PORT (a job on an embedded Ray stops with its farm submit)")
    info = cluster.connect(address)
    try:
        try:
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            raise ClusterError(f"no farm controller runs on the cluster at {address}",
                               hint="the job is not running there; see farm status") from None
        progress = ray.get(controller.cancel.remote(job.job_id))
        if progress is None:
            raise CatalogError(f"job {job.job_id} is not running on the cluster at {address}",
                               hint="see farm status; re-submit the manifest to run it again")
        return asdict(progress)
    finally:
        cluster.disconnect(info)


def pools(address: str | None = None) -> list[dict]:
    """The cluster's pools, their nodes, renderers and what they are doing."""
    import ray

    from farm import cluster

    info = cluster.connect(address)
    try:
        discovered = cluster.discover_pools()
        try:
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            live = {p["pool"]: p for p in ray.get(controller.pools.remote())}
        except ValueError:
            live = {}
        return [{"pool": c.pool.name, "gpu_type": c.pool.gpu_type, "vram_gb": c.pool.vram_gb,
                 "cost_per_hour": c.pool.cost_per_hour, "slots": c.slots, "nodes": list(c.nodes),
                 "renderers": live.get(c.pool.name, {}).get("renderers", [])} for c in discovered]
    finally:
        if info.embedded:
            cluster.disconnect(info)


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
