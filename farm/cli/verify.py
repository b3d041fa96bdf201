"""farm verify: are a job's outputs still the files farm made? With --repair, render the bad ones again.

Exit 0 when every output is as recorded (after the repair, with --repair), 1 when problems remain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from farm.cli.common import EXIT_FAILED, EXIT_OK, Format, FormatOpt, app, err, out, print_json

if TYPE_CHECKING:
    from farm import api


@app.command()
def verify(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name).")],
    sha256: Annotated[bool, typer.Option("--sha256", help="Read every byte and compare checksums (slower).")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Render the tasks with problems again.")] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Renderer slots of an embedded Ray started for --repair.")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Check every output the catalog records for a job — clips, posters, commit markers — locally
    or on S3: missing, wrong size, wrong checksum (--sha256). Exit 0 when all are as recorded,
    1 when problems remain."""
    from farm import api

    show = fmt is Format.table
    report = api.verify(job, sha256=sha256)
    data: dict = {**_report_data(report)}
    if show:
        _print_report(report)
    if repair and report.problems:
        repair_job, summary = api.repair(
            report, workers=workers, on_notice=(lambda line: err.print(line, markup=False)) if show else None
        )
        after = api.verify(report.job.job_id, sha256=sha256)  # the same job, not a newer one of its campaign
        rendered = summary.succeeded if summary else 0
        data["repair"] = {"job_id": repair_job, "rendered": rendered, "failed": summary.failed if summary else 0}
        data["remaining"] = _report_data(after)["problems"]
        if show:
            out.print(f"repair job {repair_job}: {rendered} rendered again")
            _print_report(after)
        report = after
    if not show:
        print_json(data)
    raise typer.Exit(EXIT_FAILED if report.problems else EXIT_OK)


def _report_data(report: api.VerifyReport) -> dict:
    return {
        "job_id": report.job.job_id,
        "output": report.job.output,
        "checked_tasks": report.checked,
        "checked_files": report.files,
        "problems": [
            {"task_id": p.task_id, "path": p.path, "problem": p.problem.value, "detail": p.detail}
            for p in report.problems
        ],
    }


def _print_report(report: api.VerifyReport) -> None:
    if report.problems:
        table = Table("task", "path", "problem", "detail")
        for p in report.problems:
            table.add_row(p.task_id, p.path, p.problem.value, p.detail)
        out.print(table)
    out.print(
        f"job {report.job.job_id}: {report.checked} done tasks, {report.files} files checked in "
        f"{report.job.output}: {len(report.problems) or 'no'} problem{'s' if len(report.problems) != 1 else ''}"
        + (f" — render them again with: farm verify {report.job.job_id} --repair" if report.problems else "")
    )
