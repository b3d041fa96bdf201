"""farm jobs and farm status: the jobs in the catalog and where one stands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from farm.cli.common import ClusterOpt, Format, FormatOpt, app, out, print_json


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


@app.command()
def jobs(address: ClusterOpt = None, fmt: FormatOpt = Format.table) -> None:
    """List the jobs in the catalog, oldest first."""
    from farm import api

    rows = [_status_dict(s) for s in api.jobs(address=address)]
    if fmt is Format.json:
        print_json(rows)
        return
    if not rows:
        out.print("no jobs yet: farm submit MANIFEST")
        return
    table = Table()
    for column in ("job", "campaign", "submitted", "state", "tasks", "succeeded", "failed", "blocked", "pending"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["job_id"],
            r["campaign"],
            r["submitted_at"][:19],
            r["state"],
            str(r["tasks"]),
            str(r["succeeded"]),
            str(r["failed"]),
            str(r.get("blocked", 0)),
            str(r["pending"]),
        )
    out.print(table)


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name for its newest job).")],
    address: ClusterOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Where a job stands: tasks succeeded, failed, pending (with --address, live from the cluster)."""
    from farm import api

    job_status, live = api.live_status(job, address=address)
    data = _status_dict(job_status)
    if live is not None:  # the controller's own count, ahead of the catalog's batches
        data.update(
            {
                "state": live.state,
                "succeeded": live.succeeded,
                "failed": live.failed,
                "pending": live.total - live.succeeded - live.failed,
                "running": live.in_flight,
                "queued": live.queued,
                "renderers": live.renderers,
                "eta_s": round(live.eta_s, 1) if live.eta_s is not None else None,
            }
        )
    if fmt is Format.json:
        print_json(data)
        return
    for key, value in data.items():
        out.print(f"{key.replace('_', ' '):>22}: {value}")
