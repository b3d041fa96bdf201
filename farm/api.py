"""What the CLI and Python users call: plan, submit, jobs, status, results.

Validation happens before anything runs: a bad manifest renders nothing. Submitting again is
always safe: tasks already done into the same output are skipped.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farm import __version__
from farm.audit import VerifyReport, repair_job, verify_job
from farm.catalog import Catalog, CompactionReport, JobRecord, JobStatus, ResultFilter, RunSummary
from farm.catalog_check import CheckReport
from farm.config import CPUS_PER_CPU_RENDERER, catalog_location, catalog_named, cluster_config_path
from farm.controller import CONTROLLER_NAME, NAMESPACE, JobProgress, get_or_start_controller
from farm.errors import CatalogError, ClusterError, FarmError
from farm.expand import Expansion, count, expand
from farm.local import call as _call
from farm.local import follow, run_job
from farm.local import stop_controller as _stop_embedded
from farm.manifest import ManifestFile, load_manifest
from farm.models.variants import resolve_tasks
from farm.routing import fitting_pools
from farm.scaling import PoolScaling, ScalingPlan
from farm.scaling import plan as scaling_plan
from farm.storage import open_sink
from farm.task import JobEvent, Pool, StorageKind, Task


@dataclass(frozen=True)
class Plan:
    manifest: ManifestFile
    tasks: list[Task]
    expanded: int  # before identical tasks collapsed
    done: dict[str, str]  # task_id → output uri, for tasks already rendered into this output
    routes: dict[str, int]  # cheapest fitting pool → tasks to render that would go there first
    scaling: ScalingPlan | None = None  # per pool: workers, finish time and cost for the rest
    deadline_s: float | None = None  # the manifest's deadline, in seconds from planning

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
    run: RunSummary | None = None  # None when there was nothing to render, or not waited for
    renderers: list = field(default_factory=list)  # per renderer: slot, pool, loads, load_s, pid
    progress: JobProgress | None = None  # the last the controller said (a detached submit: at hand-over)

    @property
    def failed(self) -> int:
        return self.run.failed if self.run else 0


def _catalog(root: str | Path | None, *, quarantine: bool = True) -> Catalog:
    """The catalog, opened to write (damaged files are quarantined) unless a reader asks."""
    return Catalog(root or catalog_location(), quarantine=quarantine)


def validate(manifest_path: str | Path) -> tuple[ManifestFile, int]:
    """Load and expand a manifest; returns it and its task count. Raises ManifestError."""
    mf = load_manifest(manifest_path)
    return mf, count(mf).tasks


def routes_for(tasks: list[Task], pools: list[Pool]) -> dict[str, int]:
    """Cheapest fitting pool (farm/routing.py) → task count. A task no pool can ever take is an input error."""
    counts: dict[str, int] = {}
    for task in tasks:
        fitting = fitting_pools(pools, task.needs)
        name = fitting[0].name if fitting else None
        if name is None:
            n = task.needs
            raise FarmError(
                f"task {task.task_id} ({task.source}) needs min_vram_gb={n.min_vram_gb:g}"
                + (f", gpu_type={n.gpu_type}" if n.gpu_type else "")
                + (f", pool={n.pool}" if n.pool else "")
                + " and no pool offers that ("
                + ", ".join(_describe(p) for p in pools)
                + ")",
                field="requirements",
                hint="lower the requirements or add nodes of such a pool to the cluster",
            )
        counts[name] = counts.get(name, 0) + 1
    return counts


def _describe(pool: Pool) -> str:
    vram = f"{pool.vram_gb:g} GB" if pool.vram_gb is not None else "no VRAM limit"
    return f"{pool.name}: {pool.gpu_type or 'CPU'}, {vram}, ${pool.cost_per_hour:g}/h"


def _pool_scalings(address: str | None, cluster_config: str | Path | None = None) -> list[PoolScaling]:
    """The pools a plan routes to and sizes: a named cluster's (with what its autoscaler can
    start), else those of a cluster-launcher config (``cluster_config`` or FARM_CLUSTER_CONFIG,
    read offline), else this machine's."""
    from farm import cluster

    if address:
        info = cluster.connect(address)
        try:
            return _cluster_scalings()
        finally:
            cluster.disconnect(info)
    node_types = (
        cluster.autoscaler_node_types(str(cluster_config) if cluster_config else None)
        if cluster_config or cluster_config_path()
        else []
    )
    if node_types:
        return [PoolScaling(t.pool, 0, t.slots_per_node, t.min_workers, t.max_workers) for t in node_types]
    slots = max(1, (os.cpu_count() or 1) // CPUS_PER_CPU_RENDERER)
    return [PoolScaling(Pool(cluster.LOCAL_POOL), 1, slots, 1, 1)]


def _cluster_scalings() -> list[PoolScaling]:
    """Pools with nodes now, and those the cluster's autoscaler can start nodes for, with the
    clip times the controller has measured on each: the controller's own view."""
    controller = _running_controller() or get_or_start_controller(_named_catalog(None))
    return _call(controller.pool_scalings.remote())


def plan(
    manifest_path: str | Path,
    output: str | None = None,
    catalog_root: str | Path | None = None,
    address: str | None = None,
    pools: list[Pool] | None = None,
    *,
    loaded: ManifestFile | None = None,
    expansion: Expansion | None = None,
    done: Callable[[list[str], str], dict[str, str]] | None = None,
    scalings: list[PoolScaling] | None = None,
    cluster_config: str | Path | None = None,
) -> Plan:
    """What submitting would do: tasks, already done, routes, and per pool the workers, time and
    cost to render the rest (by the manifest's deadline, if it has one). ``loaded`` is the
    manifest if the caller has read it already; ``done`` answers "already rendered?" (default:
    the local catalog); ``pools`` or ``scalings`` replace the pools looked up."""
    mf = loaded or load_manifest(manifest_path, output_override=output)
    expansion = expansion or expand(mf)
    sink = open_sink(mf.target)
    if mf.target.kind is StorageKind.S3 or not address:  # an unwritable output is an input error, found now
        sink.check_writable()  # (a local path on a cluster is each worker's: this machine cannot tell)
    if scalings is None:
        scalings = (
            [PoolScaling(p, 1, 1, 1, 1) for p in pools]
            if pools is not None
            else _pool_scalings(address, cluster_config)
        )
    # Each task's variant fixed against these pools (precision: auto): part of its id and its needs.
    expansion = replace(expansion, tasks=resolve_tasks(expansion.tasks, [s.pool for s in scalings]))
    ids = [t.task_id for t in expansion.tasks]
    output = mf.target.uri
    # A plan only reads (a damaged file is skipped); a submit has quarantined it before planning.
    catalog = _catalog(catalog_root, quarantine=False)
    already = done(ids, output) if done else catalog.done(ids, mf.target)
    to_render = [t for t in expansion.tasks if t.task_id not in already]
    routes = routes_for(to_render, [s.pool for s in scalings])
    measured = None if done else catalog.mean_clip_seconds(mf.model.identity)
    if measured:  # pools without their own measurement take this catalog's
        scalings = [s if s.seconds_per_clip else replace(s, seconds_per_clip=measured) for s in scalings]
    deadline_s = mf.deadline.seconds_left(datetime.now(UTC)) if mf.deadline is not None else None
    estimate = (
        scaling_plan(
            scalings, by_needs=Counter(t.needs for t in to_render), deadline_s=deadline_s, idle_grace_s=float("inf")
        )
        if to_render
        else None
    )
    return Plan(mf, expansion.tasks, expansion.expanded, already, routes, estimate, deadline_s)


def _new_job_id(campaign: str) -> str:
    return f"{campaign}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _named_catalog(catalog_root: str | Path | None) -> str | None:
    """The catalog a client asks a cluster's controller to use when it starts one. The cluster
    keeps its own (the head's FARM_CATALOG) unless this client was told where (argument or
    environment) — and a local path means something to the controller only when the head node is
    this machine: a laptop's folder must not become the catalog path on a cloud head."""
    if catalog_root or catalog_named():
        location = _catalog(catalog_root).location
        if StorageKind.of(location) is StorageKind.S3 or _head_is_here():
            return location
    return None


def _head_is_here() -> bool:
    import ray
    from ray.util import get_node_ip_address

    here = get_node_ip_address()
    return any(
        n["Alive"] and "node:__internal_head__" in n["Resources"] and n["NodeManagerAddress"] == here
        for n in ray.nodes()
    )


def _running_controller():
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def _controller_on(address: str):
    controller = _running_controller()
    if controller is None:
        raise ClusterError(
            f"no farm controller runs on the cluster at {address}",
            hint="submit a job there first (farm submit --address), or check the address",
        )
    return controller


def submit(
    manifest_path: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    output: str | None = None,
    catalog_root: str | Path | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_plan: Callable[[Plan, str], None] | None = None,
    wait: bool = True,
    on_notice: Callable[[str], None] | None = None,
) -> SubmitOutcome:
    """Hand every task of a manifest not yet done to the cluster's controller and, with ``wait``,
    follow the job until it ends. Without ``address`` the job runs on the catalog's embedded farm
    (and the call always waits): started here, or joined when another submit runs one on the same
    local catalog (farm/embedded.py); ``workers`` sizes a farm started here; ``on_notice`` hears
    what this submit does about the farm (joined it, keeps it up for others, took it over). With
    ``address`` the job goes to that cluster's controller, which records it in its own catalog and
    runs it whether or not this client stays."""
    from farm import cluster

    mf = load_manifest(manifest_path, output_override=output)
    expansion = expand(mf)  # a bad manifest is reported before any Ray starts
    submitted_at = datetime.now(UTC)
    if not address:  # embedded: a job with nothing left to render needs no Ray, only the catalog
        finished = _finished_from_catalog(manifest_path, mf, expansion, _catalog(catalog_root), submitted_at)
        if finished is not None:
            if on_plan:
                on_plan(finished.plan, finished.job_id)
            return finished
    if not address and not _ray_running():
        return _submit_embedded(
            manifest_path, mf, expansion, submitted_at, workers, catalog_root, on_plan, on_progress, on_notice
        )
    # Reach the cluster before recording anything: a wrong --address leaves no half-started job.
    info = cluster.connect(address, num_cpus=workers)
    try:
        controller, location, job_plan = _plan_on(info, manifest_path, mf, expansion, catalog_root)
        record = _job_record(_new_job_id(mf.manifest.campaign), manifest_path, job_plan, submitted_at)
        if on_plan:
            on_plan(job_plan, record.job_id)
        if controller is None:  # embedded and nothing to render: no controller needed to say so
            _record_nothing_to_render(Catalog(location), record, job_plan)
            return SubmitOutcome(record.job_id, job_plan, location, mf.target.uri, 0)
        return _run(controller, info.embedded, record, job_plan, location, wait, on_progress)
    finally:
        if info.embedded:
            cluster.disconnect(info)


def _finished_from_catalog(
    manifest_path: str | Path, mf: ManifestFile, expansion: Expansion, catalog: Catalog, submitted_at: datetime
) -> SubmitOutcome | None:
    """The outcome of a job whose every task the catalog has done into this output, recorded as
    a job with nothing to render; None when something is left to render."""
    done = catalog.done([t.task_id for t in expansion.tasks], mf.target)
    if len(done) < len(expansion.tasks):
        return None
    deadline_s = mf.deadline.seconds_left(submitted_at) if mf.deadline is not None else None
    job_plan = Plan(mf, expansion.tasks, expansion.expanded, done, {}, None, deadline_s)
    record = _job_record(_new_job_id(mf.manifest.campaign), manifest_path, job_plan, submitted_at)
    _record_nothing_to_render(catalog, record, job_plan)
    return SubmitOutcome(record.job_id, job_plan, catalog.location, mf.target.uri, 0)


def _record_nothing_to_render(catalog: Catalog, record: JobRecord, job_plan: Plan) -> None:
    catalog.record_tasks(record.job_id, job_plan.tasks)
    catalog.record_job(record)
    catalog.record_event(record.job_id, JobEvent.FINISHED, "nothing to render")


def _ray_running() -> bool:
    """Whether this process is a Ray driver already (a Python user's own Ray, or the tests'): a
    submit then uses that Ray as its cluster."""
    import ray

    return bool(ray.is_initialized())


def _submit_embedded(
    manifest_path: str | Path,
    mf: ManifestFile,
    expansion: Expansion,
    submitted_at: datetime,
    workers: int | None,
    catalog_root: str | Path | None,
    on_plan: Callable[[Plan, str], None] | None,
    on_progress: Callable[[JobProgress], None] | None,
    on_notice: Callable[[str], None] | None,
) -> SubmitOutcome:
    """A submit without --address: environment checked and the job planned before any Ray starts,
    then run on the catalog's embedded farm (local catalog: owned or joined) or, on an S3 catalog
    (no lock is reliable there), on a Ray of its own."""
    from farm import cluster

    catalog = _catalog(catalog_root)
    _check_places(catalog, mf)
    slots = workers or max(1, (os.cpu_count() or 1) // CPUS_PER_CPU_RENDERER)
    scalings = [PoolScaling(Pool(cluster.LOCAL_POOL), 1, slots, 1, 1)]
    job_plan = plan(manifest_path, loaded=mf, expansion=expansion, catalog_root=catalog.location, scalings=scalings)
    record = _job_record(_new_job_id(mf.manifest.campaign), manifest_path, job_plan, submitted_at)
    if on_plan:
        on_plan(job_plan, record.job_id)
    if not job_plan.to_render:
        _record_nothing_to_render(catalog, record, job_plan)
        return SubmitOutcome(record.job_id, job_plan, catalog.location, mf.target.uri, 0)
    run = run_job(record, job_plan.tasks, catalog, workers, on_progress, on_notice)
    summary = run.summary
    return SubmitOutcome(
        record.job_id,
        job_plan,
        catalog.location,
        mf.target.uri,
        summary.recovered,
        summary,
        run.renderers,
        run.progress,
    )


def _check_places(catalog: Catalog, mf: ManifestFile | None) -> None:
    """Environment mistakes are one line before anything renders: FARM_HOME, a local catalog and
    the built-in models' folder must be creatable (the output is checked by ``plan``)."""
    from farm.config import check_places, models_dir
    from farm.task import ModelKind

    places = [Path(catalog.base)] if StorageKind.of(catalog.location) is StorageKind.LOCAL else []
    if mf is None or mf.model.kind is ModelKind.BUILTIN:
        places.append(models_dir())
    check_places(places)


def _plan_on(
    info: Any, manifest_path: str | Path, mf: ManifestFile, expansion: Expansion, catalog_root: str | Path | None
) -> tuple[Any, str, Plan]:
    """The controller (None: embedded with nothing to render), its catalog and the plan."""
    from farm import cluster

    if not info.embedded:
        controller = get_or_start_controller(_named_catalog(catalog_root))
        location = _call(controller.ping.remote())["catalog"]
        job_plan = plan(
            manifest_path,
            loaded=mf,
            expansion=expansion,
            address=info.address,
            scalings=_cluster_scalings(),
            done=lambda ids, out: _call(controller.done.remote(ids, out)),
        )
        return controller, location, job_plan
    location = _catalog(catalog_root).location
    job_plan = plan(
        manifest_path,
        loaded=mf,
        expansion=expansion,
        catalog_root=location,
        scalings=[PoolScaling.fixed(c.pool, len(c.nodes), c.slots) for c in cluster.discover_pools()],
    )
    return (get_or_start_controller(location) if job_plan.to_render else None), location, job_plan


def _run(
    controller: Any,
    embedded: bool,
    record: JobRecord,
    job_plan: Plan,
    location: str,
    wait: bool,
    on_progress: Callable[[JobProgress], None] | None,
) -> SubmitOutcome:
    """Hand the job to the controller and, with ``wait``, follow it to its end and sum it up."""
    started = time.monotonic()
    output = job_plan.manifest.target.uri
    try:
        progress = _call(controller.submit_job.remote(record, job_plan.tasks))
        if not wait:
            return SubmitOutcome(record.job_id, job_plan, location, output, 0, progress=progress)
        progress = follow(controller, progress, on_progress)
    except BaseException:  # Ctrl-C, lost cluster
        if embedded:  # the job goes down with this process: keep what is done, say so
            _stop_embedded(controller)
            Catalog(location).record_event(record.job_id, JobEvent.INTERRUPTED, "the submitting client stopped")
        raise
    renderers = _call(controller.renderer_stats.remote())
    elapsed = time.monotonic() - started
    if embedded:
        _stop_embedded(controller)
        summary = Catalog(location).run_summary(record.job_id, elapsed, progress.state)
    else:
        summary = _call(controller.run_summary.remote(record.job_id, elapsed, progress.state))
    return SubmitOutcome(record.job_id, job_plan, location, output, summary.recovered, summary, renderers, progress)


def _job_record(job_id: str, manifest_path: str | Path, job_plan: Plan, submitted_at: datetime) -> JobRecord:
    mf = job_plan.manifest
    return JobRecord(
        job_id=job_id,
        campaign=mf.manifest.campaign,
        submitted_at=submitted_at,
        user=getpass.getuser(),
        host=socket.gethostname(),
        manifest_path=str(Path(manifest_path).resolve()),
        manifest_sha256=hashlib.sha256(mf.text.encode()).hexdigest(),
        manifest_yaml=mf.text,
        model=mf.model.spec,
        output=mf.target.uri,
        max_attempts=mf.max_attempts,
        task_ids=tuple(t.task_id for t in job_plan.tasks),
        farm_version=__version__,
        priority=mf.manifest.priority,
        timeout_s=mf.manifest.timeout_s,
        storage_json=mf.target.options.to_json(),
        deadline_at=mf.deadline.due(submitted_at) if mf.deadline is not None else None,
    )


def cancel(job_id: str, address: str | None = None, catalog_root: str | Path | None = None) -> dict:
    """Stop a running job: no new dispatch, running attempts stopped within seconds."""
    from farm import cluster

    if not address:
        raise FarmError(
            "cancel needs the cluster the job runs on",
            field="--address",
            hint="give --address HOST:PORT (a job on an embedded Ray stops with its farm submit)",
        )
    info = cluster.connect(address)
    try:
        controller = _controller_on(address)
        job_status, _ = _call(controller.job_status.remote(job_id))
        progress = _call(controller.cancel.remote(job_status.job.job_id))
        if progress is None:
            raise CatalogError(
                f"job {job_status.job.job_id} is not running on the cluster at {address}",
                hint="see farm status; re-submit the manifest to run it again",
            )
        return asdict(progress)
    finally:
        cluster.disconnect(info)


def pools(address: str | None = None) -> list[dict]:
    """The cluster's pools, their nodes, renderers and what they are doing; with an autoscaler,
    also the pools it can start and what the controller asked it for."""
    from farm import cluster

    info = cluster.connect(address)
    try:
        discovered = {c.pool.name: c for c in cluster.discover_pools()}
        controller = _running_controller()
        live = {p["pool"]: p for p in _call(controller.pools.remote())} if controller else {}
        scaling = _call(controller.scaling_status.remote()) if controller else {}
        targets = {d["pool"]: d for d in scaling.get("decisions", [])}
        names = list(discovered) + [
            t["pool"]["name"] for t in scaling.get("node_types", []) if t["pool"]["name"] not in discovered
        ]
        rows = []
        for name in names:
            cap = discovered.get(name)
            pool = (
                cap.pool if cap else Pool(**next(t["pool"] for t in scaling["node_types"] if t["pool"]["name"] == name))
            )
            rows.append(
                {
                    "pool": name,
                    "gpu_type": pool.gpu_type,
                    "vram_gb": pool.vram_gb,
                    "cost_per_hour": pool.cost_per_hour,
                    "slots": cap.slots if cap else 0,
                    "nodes": list(cap.nodes) if cap else [],
                    "renderers": live.get(name, {}).get("renderers", []),
                    "target_nodes": targets[name]["target_workers"] if name in targets else None,
                    "scaling": targets[name]["reason"] if name in targets else "",
                }
            )
        return rows
    finally:
        if info.embedded:
            cluster.disconnect(info)


def _from_cluster(address: str, method: str, *args):
    from farm import cluster

    info = cluster.connect(address)
    try:
        return _call(getattr(_controller_on(address), method).remote(*args))
    finally:
        cluster.disconnect(info)


def jobs(catalog_root: str | Path | None = None, address: str | None = None) -> list[JobStatus]:
    if address:
        return _from_cluster(address, "job_statuses")
    catalog = _catalog(catalog_root, quarantine=False)
    return catalog.statuses(catalog.jobs())


def status(job_id: str, catalog_root: str | Path | None = None, address: str | None = None) -> JobStatus:
    """A job's status from the catalog (with ``address``, the cluster controller's catalog)."""
    return live_status(job_id, catalog_root, address)[0]


def live_status(
    job_id: str, catalog_root: str | Path | None = None, address: str | None = None
) -> tuple[JobStatus, JobProgress | None]:
    """A job's status, and with ``address`` its live progress on the cluster (None once it ended)."""
    if address:
        return _from_cluster(address, "job_status", job_id)
    catalog = _catalog(catalog_root, quarantine=False)
    return catalog.status(catalog.job(job_id)), None


def results(
    job_id: str, keep: ResultFilter | None = None, catalog_root: str | Path | None = None, address: str | None = None
) -> tuple[JobRecord, list[dict]]:
    if address:
        return _from_cluster(address, "job_results", job_id, keep)
    catalog = _catalog(catalog_root, quarantine=False)
    job = catalog.job(job_id)
    return job, catalog.results(job, keep)


def compact(job_id: str | None = None, catalog_root: str | Path | None = None) -> CompactionReport:
    catalog = _catalog(catalog_root)
    if job_id:
        job_id = catalog.job(job_id).job_id
    return catalog.compact(job_id)


def check_catalog(dry_run: bool = False, catalog_root: str | Path | None = None) -> CheckReport:
    """Read every catalog file; quarantine the damaged ones (not with ``dry_run``) and restore the
    attempt rows of quarantined batches from the outputs' commit markers."""
    from farm.catalog_check import check

    return check(_catalog(catalog_root), dry_run)


def verify(job_ref: str, *, sha256: bool = False, catalog_root: str | Path | None = None) -> VerifyReport:
    """Check every output the catalog records for a job's done tasks (clip, poster, commit marker),
    locally or on S3; with ``sha256`` read every byte against the recorded checksums."""
    return verify_job(_catalog(catalog_root, quarantine=False), job_ref, sha256)


def repair(
    report: VerifyReport,
    *,
    workers: int | None = None,
    catalog_root: str | Path | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> tuple[str, RunSummary | None]:
    """Render again the tasks whose outputs ``verify`` found wrong (farm/audit.py), on this
    machine's farm as a submit would. Returns the repair job's id and how it ran (None: nothing
    to repair)."""
    catalog = _catalog(catalog_root)
    if not report.problems:
        return "", None
    _check_places(catalog, None)
    job_id = _new_job_id(report.job.campaign)
    return job_id, repair_job(catalog, report, job_id, workers, on_progress, on_notice)
