"""The `farm` command: parse arguments, call farm.api, show the answer. No logic of its own.

Exit codes: 0 everything succeeded, 1 some tasks failed, 2 bad input (one line on stderr),
130 interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from farm import api
from farm.catalog import ResultFilter
from farm.errors import FarmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="farm: render generative-video campaigns on a Ray cluster, catalogued in Parquet.",
    pretty_exceptions_enable=False,
)
# Piped output (scripts, CI logs) gets wide tables instead of rich's 80-column default.
class _Stdout:
    """The command's own output stream. Under main() it is the real stdout, and sys.stdout is
    pointed at stderr: Ray prints cluster events (a node died…) to sys.stdout from a background
    thread, and they must not end up inside the JSON a script reads."""

    real = None

    def write(self, text: str) -> int:
        return (self.real or sys.stdout).write(text)

    def flush(self) -> None:
        (self.real or sys.stdout).flush()

    def isatty(self) -> bool:
        return (self.real or sys.stdout).isatty()


stdout = _Stdout()
out = Console(file=stdout, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# typer ≥ 0.2x vendors click and raises its own exception types; older releases raise click's.
if hasattr(typer, "TyperException"):
    _USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
else:  # pragma: no cover - older typer
    import click

    _USAGE_ERRORS = (click.ClickException,)


class Format(StrEnum):
    table = "table"
    json = "json"


class ResultsFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


ManifestArg = Annotated[Path, typer.Argument(help="The campaign manifest (YAML).", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table for people, json for scripts.")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Where videos go; overrides the manifest's output:.")
]


def _json(data: Any) -> None:
    stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _scaling_dict(scaling) -> dict | None:
    if scaling is None:
        return None
    reasons = {d.pool: d.reason for d in scaling.decisions}
    return {
        "reachable": scaling.reachable,
        "cost_dollars": round(scaling.cost_dollars, 2),
        "unroutable": scaling.unroutable,
        "pools": {e.pool: {"tasks": e.backlog, "workers": e.workers, "workers_needed": e.workers_needed,
                           "finish_s": e.finish_s if e.finish_s != float("inf") else None,
                           "cost_dollars": e.cost_dollars, "reachable": e.reachable, "reason": reasons[e.pool]}
                  for e in scaling.estimates},
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@app.command()
def validate(manifest: ManifestArg) -> None:
    """Check a manifest: schema, placeholders, sizes the model can take. Renders nothing."""
    mf, count = api.validate(manifest)
    out.print(f"[green]ok[/green] {manifest}: campaign {mf.manifest.campaign}, {count} tasks, model {mf.model.spec}")


AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster to use (e.g. 10.0.0.5:6379); default: an embedded local Ray.")
]


@app.command()
def plan(
    manifest: ManifestArg,
    output: OutputOpt = None,
    address: Annotated[str | None, typer.Option(help="Route against this Ray cluster's pools.")] = None,
    show: Annotated[int, typer.Option(help="List this many of the tasks that will render.")] = 10,
    cluster_config: Annotated[Path | None, typer.Option(
        help="Estimate for the pools of this cluster-launcher config (e.g. cluster.yaml), offline.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Show what submitting a manifest would do: tasks, already done, to render, which pool each
    would go to, and per pool the workers, time and cost to render them (by the manifest's
    deadline, if it gives one)."""
    p = api.plan(manifest, output, address=address, cluster_config=cluster_config)
    mf = p.manifest
    summary = {
        "campaign": mf.manifest.campaign,
        "manifest": str(manifest),
        "model": mf.model.spec,
        "output": mf.output,
        "tasks": len(p.tasks),
        "identical_collapsed": p.expanded - len(p.tasks),
        "already_done": len(p.done),
        "to_render": len(p.to_render),
        "max_attempts": mf.max_attempts,
        "priority": mf.manifest.priority,
        "routes": p.routes,
        "deadline_s": round(p.deadline_s) if p.deadline_s is not None else None,
        "scaling": _scaling_dict(p.scaling),
    }
    if fmt is Format.json:
        summary["to_render_tasks"] = [
            {"task_id": t.task_id, "prompt": t.prompt, "seed": t.seed, "variant": t.variant_dict,
             "width": t.settings.width, "height": t.settings.height, "frames": t.settings.frames,
             "min_vram_gb": t.needs.min_vram_gb}
            for t in p.to_render
        ]
        _json(summary)
        return
    for key, value in summary.items():
        if key == "scaling":
            continue
        if key == "routes":
            value = ", ".join(f"{n} tasks → pool {pool}" for pool, n in value.items()) or "nothing to route"
        if key == "deadline_s":
            key, value = "deadline", ("none" if value is None else f"in {_duration(value)}" if value >= 0
                                      else f"passed {_duration(-value)} ago: workers are sized as without one")
        out.print(f"{key.replace('_', ' '):>20}: {value}", markup=False)
    if p.scaling:
        table = Table(title="to render it" + (" by the deadline" if p.deadline_s is not None else ""))
        for column in ("pool", "tasks", "workers", "done in", "cost", ""):
            table.add_column(column)
        reasons = {d.pool: d.reason for d in p.scaling.decisions}
        for e in p.scaling.estimates:
            if e.backlog:
                table.add_row(e.pool, str(e.backlog), str(e.workers), _duration(e.finish_s)
                              if e.finish_s != float("inf") else "never", f"${e.cost_dollars:,.2f}",
                              "" if e.reachable else "[red]misses the deadline[/red]")
        out.print(table)
        for e in p.scaling.estimates:
            if e.backlog:
                out.print(f"  {e.pool}: {reasons[e.pool]}", markup=False, highlight=False)
    if p.to_render and show > 0:
        table = Table(title=f"first {min(show, len(p.to_render))} of {len(p.to_render)} to render")
        for column in ("task", "size", "seed", "prompt"):
            table.add_column(column)
        for t in p.to_render[:show]:
            s = t.settings
            table.add_row(t.task_id[:12], f"{s.width}x{s.height}x{s.frames}", str(t.seed), t.prompt)
        out.print(table)


@app.command()
def submit(
    manifest: ManifestArg,
    address: AddressOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Renderer slots of an embedded Ray; default one per GPU, else one per core."),
    ] = None,
    output: OutputOpt = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="With --address: follow the job until it ends (default: hand it over and return).")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Render every task of a manifest that is not done yet, and catalog every attempt.

    Without --address the job runs on an embedded Ray and the command waits for it. With
    --address it goes to that cluster's controller and the command returns at once (--wait
    follows it); the job runs on whether or not this shell stays."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = fmt is Format.table
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
    )
    bar: list = []

    plan_done: dict = {}

    def on_plan(p: api.Plan, job_id: str) -> None:
        plan_done.update(p.done)
        if show:
            err.print(f"job [bold]{job_id}[/bold]: {len(p.tasks)} tasks, {len(p.done)} already done, "
                      f"{len(p.to_render)} to render")
        if p.to_render:
            bar.append(progress.add_task("rendering", total=len(p.to_render), detail="starting renderers…"))

    def on_progress(pr) -> None:
        if bar:
            waiting = f" · {pr.waiting_for_pool} waiting for a pool" if pr.waiting_for_pool else ""
            progress.update(bar[0], completed=pr.succeeded + pr.failed - len(plan_done),
                            detail=f"done {pr.succeeded - len(plan_done)} · failed {pr.failed} · "
                                   f"{pr.renderers} renderers · ETA {_duration(pr.eta_s)}{waiting}")

    follow = wait or not address
    job_ids: list[str] = []

    def remember(p: api.Plan, job_id: str) -> None:
        job_ids.append(job_id)
        on_plan(p, job_id)
        if address and p.to_render and not p.manifest.output.startswith("s3://"):
            err.print(f"note: output {p.manifest.output} is a local path: each node writes its clips to that "
                      "path on its own disk — use an s3:// output or a mount every node shares",
                      markup=False, highlight=False)

    try:
        with progress:
            result = api.submit(manifest, address=address, workers=workers, output=output,
                                on_progress=on_progress if follow else None, on_plan=remember, wait=follow)
    except KeyboardInterrupt:
        if address and job_ids:  # only this shell stopped: the cluster's controller runs the job on
            err.print(f"stopped following; job {job_ids[0]} goes on on the cluster — "
                      f"farm status {job_ids[0]} --address {address}", markup=False, highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise
    if result.run is None and result.progress is not None:  # handed over, not followed
        p = result.progress
        data = {"job_id": result.job_id, "state": p.state, "tasks": p.total, "already_done": p.succeeded,
                "to_render": p.total - p.succeeded, "catalog": result.catalog_root, "outputs": result.output}
        if show:
            out.print(f"job {result.job_id} handed to the cluster at {address}: {data['to_render']} to render, "
                      f"{data['already_done']} already done")
            out.print(f"follow it:  farm status {result.job_id} --address {address}")
            out.print(f"stop it:    farm cancel {result.job_id} --address {address}")
        else:
            _json(data)
        raise typer.Exit(EXIT_OK)
    run = result.run
    summary = {
        "job_id": result.job_id,
        "tasks": len(result.plan.tasks),
        "already_done": len(result.plan.done) + result.recovered,
        "rendered": run.succeeded if run else 0,
        "failed": run.failed if run else 0,
        "attempts": run.attempts if run else 0,
        "elapsed_s": round(run.elapsed_s, 2) if run else 0.0,
        "renderers": len(result.renderers),
        "state": run.state if run else "finished",
        "outputs": result.output,
        "catalog": result.catalog_root,
    }
    if show:
        colour = "red" if summary["failed"] else "green"
        out.print(f"[{colour}]job {result.job_id}[/{colour}]: {summary['rendered']} rendered, "
                  f"{summary['already_done']} already done, {summary['failed']} failed "
                  f"in {_duration(summary['elapsed_s'])} on {summary['renderers']} renderers")
        out.print(f"videos:  {result.output}")
        out.print(f"catalog: {result.catalog_root}")
        if summary["failed"]:
            out.print(f"see the errors with: farm results {result.job_id} --status failed")
    else:
        _json(summary)
    raise typer.Exit(EXIT_FAILED if summary["failed"] else EXIT_OK)


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name).")],
    address: Annotated[str | None, typer.Option(help="The Ray cluster the job runs on.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Stop a running job: nothing new is dispatched and running attempts stop within seconds.
    Submitting the manifest again resumes it."""
    progress = api.cancel(job, address)
    if fmt is Format.json:
        _json(progress)
        return
    out.print(f"job {progress['job_id']}: cancelling — {progress['succeeded']} done, {progress['in_flight']} "
              f"running attempts stop within seconds; submit the manifest again to resume")


@app.command()
def pools(
    address: Annotated[str | None, typer.Option(help="The Ray cluster to look at.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """The cluster's renderer pools: GPU type, VRAM, cost, nodes, renderers and what they do."""
    rows = api.pools(address)
    if fmt is Format.json:
        _json(rows)
        return
    table = Table()
    for column in ("pool", "gpu", "vram", "$/h", "slots", "nodes", "renderers", "busy"):
        table.add_column(column)
    for r in rows:
        busy = sum(bool(x["busy"]) for x in r["renderers"])
        table.add_row(r["pool"], r["gpu_type"] or "CPU", f"{r['vram_gb']:g} GB" if r["vram_gb"] else "-",
                      f"{r['cost_per_hour']:g}", str(r["slots"]), str(len(r["nodes"])), str(len(r["renderers"])),
                      str(busy))
    out.print(table)


def _status_dict(s) -> dict:
    return {
        "job_id": s.job.job_id,
        "campaign": s.job.campaign,
        "submitted_at": s.job.submitted_at.isoformat(),
        "user": s.job.user,
        "state": s.state,
        "tasks": s.job.task_count,
        **s.counts,
        "attempts": s.attempts,
        "rendered_by_this_job": s.rendered,
        "model": s.job.model,
        "output": s.job.output,
        "manifest": s.job.manifest_path,
    }


ClusterOpt = Annotated[
    str | None, typer.Option("--address", help="Ask this Ray cluster's farm controller (its catalog), HOST:PORT.")
]


@app.command()
def jobs(address: ClusterOpt = None, fmt: FormatOpt = Format.table) -> None:
    """List the jobs in the catalog, oldest first."""
    rows = [_status_dict(s) for s in api.jobs(address=address)]
    if fmt is Format.json:
        _json(rows)
        return
    if not rows:
        out.print("no jobs yet: farm submit MANIFEST")
        return
    table = Table()
    for column in ("job", "campaign", "submitted", "state", "tasks", "succeeded", "failed", "pending"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["job_id"], r["campaign"], r["submitted_at"][:19], r["state"], str(r["tasks"]),
                      str(r["succeeded"]), str(r["failed"]), str(r["pending"]))
    out.print(table)


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name for its newest job).")],
    address: ClusterOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Where a job stands: tasks succeeded, failed, pending (with --address, live from the cluster)."""
    job_status, live = api.live_status(job, address=address)
    data = _status_dict(job_status)
    if live is not None:  # the controller's own count, ahead of the catalog's batches
        data.update({"state": live.state, "succeeded": live.succeeded, "failed": live.failed,
                     "pending": live.total - live.succeeded - live.failed, "running": live.in_flight,
                     "queued": live.queued, "renderers": live.renderers,
                     "eta_s": round(live.eta_s, 1) if live.eta_s is not None else None})
    if fmt is Format.json:
        _json(data)
        return
    for key, value in data.items():
        out.print(f"{key.replace('_', ' '):>22}: {value}")


RESULT_COLUMNS = ("task_id", "status", "attempt", "seed", "width", "height", "frames", "bytes", "generate_s",
                  "output_uri", "error")


def _when(value: str | None, option: str) -> datetime | None:
    """An ISO time (UTC unless it says otherwise) or an age like 30m, 2h, 7d."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FarmError(f"{value!r} is neither an ISO time nor an age", field=option,
                        hint="use e.g. 2026-11-25T08:00 or 2h") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _where(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FarmError(f"{pair!r} is not KEY=VALUE", field="--where", hint="e.g. --where product=shoe")
        out.append((key.strip(), value.strip()))
    return tuple(out)


@app.command()
def results(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name).")],
    fmt: Annotated[
        ResultsFormat, typer.Option("--format", "-f", help="table, csv, json or parquet (parquet needs --out).")
    ] = ResultsFormat.table,
    status_filter: Annotated[
        str | None, typer.Option("--status", help="Only tasks with this status (succeeded, failed).")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option("--where", help="Only rows whose variant has KEY=VALUE (repeatable).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Finished at or after: ISO time or age (30m, 2h, 7d).")] = None,
    until: Annotated[str | None, typer.Option(help="Finished at or before: ISO time or age.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    address: ClusterOpt = None,
) -> None:
    """One row per task of a job: its clip, or its last error. Filter, then show or export."""
    keep = ResultFilter(status_filter, _where(where or []), _when(since, "--since"), _when(until, "--until"))
    _, rows = api.results(job, keep, address=address)
    if fmt is ResultsFormat.parquet:
        if out_path is None:
            raise FarmError("parquet needs a file", field="--format", hint="add --out results.parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        from farm.catalog import ATTEMPT_FULL_SCHEMA

        pq.write_table(pa.Table.from_pylist(rows, schema=ATTEMPT_FULL_SCHEMA), out_path)
        err.print(f"{len(rows)} rows written to {out_path}")
        return
    for r in rows:
        r["variant"] = dict(r["variant"] or [])
    if fmt is ResultsFormat.table:
        table = Table()
        for column in ("task", "status", "try", "variant", "seed", "size", "output / error"):
            table.add_column(column)
        for r in rows:
            variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items())
            detail = r["output_uri"] if r["status"] == "succeeded" else r["error"]
            table.add_row(r["task_id"][:12], r["status"], str(r["attempt"]), variant, str(r["seed"]),
                          f"{r['width']}x{r['height']}x{r['frames']}", detail)
        out.print(table)
        return
    if fmt is ResultsFormat.json:
        text = json.dumps(rows, indent=2, default=str) + "\n"
    else:
        buffer = io.StringIO()
        variant_keys = sorted({k for r in rows for k in r["variant"]})
        writer = csv.writer(buffer)
        writer.writerow([*RESULT_COLUMNS, "prompt", "finished_at", *variant_keys])
        for r in rows:
            writer.writerow([r[c] for c in RESULT_COLUMNS] + [r["prompt"], r["finished_at"].isoformat()]
                            + [r["variant"].get(k, "") for k in variant_keys])
        text = buffer.getvalue()
    if out_path is None:
        stdout.write(text)
    else:
        out_path.write_text(text)
        err.print(f"{len(rows)} rows written to {out_path}")


catalog_app = typer.Typer(help="Catalog maintenance.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("compact")
def catalog_compact(
    job: Annotated[str | None, typer.Argument(help="Only this job (default: every job).")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Merge each job's small batch files into one. Safe to interrupt and to run again."""
    report = api.compact(job)
    if fmt is Format.json:
        _json(report.__dict__)
        return
    out.print(f"{report.partitions} partitions: {report.merged_files} files merged into {report.written_files} "
              f"({report.rows} rows); {report.finished_deletes} leftovers of an interrupted run removed")


monitor_app = typer.Typer(help="Prometheus and Grafana for this machine (loopback only).", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


def _print_services(services, fmt: Format) -> None:
    if fmt is Format.json:
        _json([s.__dict__ for s in services])
        return
    for s in services:
        state = "running" if s.running else "not running"
        where = f" {s.url}" if s.url and s.running else ""
        pid = f" (pid {s.pid})" if s.pid else ""
        note = f" — {s.note}" if s.note else ""
        out.print(f"{s.name}: {state}{where}{pid}{note}", markup=False, highlight=False)


@monitor_app.command("up")
def monitor_up(
    prometheus_port: Annotated[int, typer.Option(help="Prometheus listens on 127.0.0.1:PORT.")] = 9090,
    grafana_port: Annotated[int, typer.Option(help="Grafana (if installed) listens on 127.0.0.1:PORT.")] = 3000,
    fmt: FormatOpt = Format.table,
) -> None:
    """Start Prometheus (and Grafana where installed) scraping farm and Ray, with farm's alerts
    and dashboards. Stays up in the background until 'farm monitor down'."""
    from farm import monitor

    _print_services(monitor.up(prometheus_port, grafana_port), fmt)


@monitor_app.command("down")
def monitor_down(fmt: FormatOpt = Format.table) -> None:
    """Stop what 'farm monitor up' started."""
    from farm import monitor

    _print_services(monitor.down(), fmt)


@monitor_app.command("status")
def monitor_status(fmt: FormatOpt = Format.table) -> None:
    """Whether Prometheus and Grafana started by 'farm monitor up' are running."""
    from farm import monitor

    _print_services(monitor.status(), fmt)


cluster_app = typer.Typer(help="Start, stop and inspect a Ray cluster from a cluster.yaml (Ray's cluster launcher).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
ClusterConfigArg = Annotated[Path, typer.Argument(help="The cluster-launcher config.")]


def _launched(config, what: str) -> None:
    pools = ", ".join(f"{t.pool.name} ({t.pool.gpu_type} {t.pool.vram_gb} GB, ${t.pool.cost_per_hour:.2f}/h per slot, "
                      f"{t.min_workers}–{t.max_workers} '{t.name}' nodes)" for t in config.node_types)
    out.print(f"cluster '{config.cluster_name}' {what}; pools: {pools}", markup=False, highlight=False)


@cluster_app.command("up")
def cluster_up(
    config: ClusterConfigArg = Path("cluster.yaml"),
    restart: Annotated[bool, typer.Option(help="Restart Ray on nodes that are already up.")] = True,
) -> None:
    """Check CONFIG, create the cluster's Ray token if missing, then 'ray up'. Workers of each pool
    are started by Ray's autoscaler when farm asks for them."""
    from farm import launcher

    _launched(launcher.up(config, restart=restart).config, "is up")
    out.print(f"next: ray attach {config}, then 'farm submit MANIFEST --address auto' on the head node "
              "(farm's image sets RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH for that shell)", markup=False, highlight=False)


@cluster_app.command("down")
def cluster_down(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Terminate every node of the cluster ('ray down'). The catalog on the head goes with it unless
    FARM_CATALOG points at S3."""
    from farm import launcher

    _launched(launcher.down(config).config, "is down")


@cluster_app.command("status")
def cluster_status(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Ray's view of the cluster: nodes per type, resources in use, pending requests."""
    from farm import launcher

    launcher.status(config, echo=stdout)


@cluster_app.command("check")
def cluster_check(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Check CONFIG the way 'farm cluster up' does (Ray's schema, farm pools, token auth), offline."""
    from farm import launcher

    _launched(launcher.load_config(config), "config is valid")


def main() -> None:
    stdout.real, sys.stdout = sys.stdout, sys.stderr
    try:
        # Without standalone mode click hands back typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else EXIT_OK)
    except FarmError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort
        err.print("interrupted: finished clips are catalogued; submit the manifest again to resume",
                  markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except _USAGE_ERRORS as exc:  # bad arguments: one line, not click's usage box
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx else "farm"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"error: {message} — see '{command} --help'", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
