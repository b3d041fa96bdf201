"""farm submit and farm cancel: start a job (and follow it with a progress bar), stop it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from farm.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AddressOpt,
    Format,
    FormatOpt,
    ManifestArg,
    OutputOpt,
    app,
    err,
    format_duration,
    out,
    print_json,
)
from farm.task import StorageKind

if TYPE_CHECKING:
    from farm import api


@app.command()
def submit(
    manifest: ManifestArg,
    address: AddressOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Renderer slots of an embedded Ray; default one per GPU, else one per core."),
    ] = None,
    output: OutputOpt = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="With --address: follow the job until it ends (default: hand it over and return)."),
    ] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Render every task of a manifest that is not done yet, and catalog every attempt.

    Without --address the job runs on an embedded Ray and the command waits for it; a second
    submit on the same catalog joins the running one (and takes it over if it stops). With
    --address it goes to that cluster's controller and the command returns at once (--wait
    follows it); the job runs on whether or not this shell stays."""
    from farm import api

    show = fmt is Format.table
    follow = wait or not address
    display = _Progress(show, address)
    try:
        try:
            result = api.submit(
                manifest,
                address=address,
                workers=workers,
                output=output,
                on_progress=display.on_progress if follow else None,
                on_plan=display.on_plan,
                wait=follow,
                on_notice=display.on_notice,
            )
        finally:
            display.stop()
    except KeyboardInterrupt:
        if address and display.job_ids:  # only this shell stopped: the cluster's controller runs the job on
            job_id = display.job_ids[0]
            err.print(
                f"stopped following; job {job_id} goes on on the cluster — farm status {job_id} --address {address}",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise
    if result.run is None and result.progress is not None:  # handed over, not followed
        _print_handed_over(result, address, show)
        raise typer.Exit(EXIT_OK)
    summary = _run_summary(result)
    if show:
        _print_run(result, summary)
    else:
        print_json(summary)
    raise typer.Exit(EXIT_FAILED if summary["failed"] else EXIT_OK)


class _Progress:
    """The progress bar on stderr while a job renders, fed by api.submit's on_plan and on_progress."""

    def __init__(self, show: bool, address: str | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.show, self.address = show, address
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not show,
        )
        self.bar: list = []
        self.plan_done: dict = {}
        self.job_ids: list[str] = []

    def on_plan(self, p: api.Plan, job_id: str) -> None:
        self.job_ids.append(job_id)
        self.plan_done.update(p.done)
        if self.show:
            err.print(
                f"job [bold]{job_id}[/bold]: {len(p.tasks)} tasks, {len(p.done)} already done, "
                f"{len(p.to_render)} to render"
            )
        if p.to_render:
            self.bar.append(self.progress.add_task("rendering", total=len(p.to_render), detail="starting renderers…"))
            self.progress.start()  # only now: a bad manifest or a finished job leaves stderr to its one line
        if self.address and p.to_render and p.manifest.target.kind is StorageKind.LOCAL:
            err.print(
                f"note: output {p.manifest.target.uri} is a local path: each node writes its clips to that "
                "path on its own disk — use an s3:// output or a mount every node shares",
                markup=False,
                highlight=False,
            )

    def on_notice(self, line: str) -> None:
        """What this submit does about the embedded farm (joined it, keeps it up, took it over)."""
        if self.show:
            self.progress.console.print(line, markup=False, highlight=False)

    def stop(self) -> None:
        if self.bar:
            self.progress.stop()

    def on_progress(self, pr) -> None:
        if self.bar:
            done = len(self.plan_done)
            waiting = f" · {pr.waiting_for_pool} waiting for a pool" if pr.waiting_for_pool else ""
            self.progress.update(
                self.bar[0],
                completed=pr.succeeded + pr.failed - done,
                detail=f"done {pr.succeeded - done} · failed {pr.failed} · "
                f"{pr.renderers} renderers · ETA {format_duration(pr.eta_s)}{waiting}",
            )


def _print_handed_over(result: api.SubmitOutcome, address: str | None, show: bool) -> None:
    p = result.progress
    assert p is not None  # a job handed over without waiting always has the controller's first word
    data = {
        "job_id": result.job_id,
        "state": p.state,
        "tasks": p.total,
        "already_done": p.succeeded,
        "to_render": p.total - p.succeeded,
        "catalog": result.catalog_root,
        "outputs": result.output,
    }
    if not show:
        print_json(data)
        return
    out.print(
        f"job {result.job_id} handed to the cluster at {address}: {data['to_render']} to render, "
        f"{data['already_done']} already done"
    )
    out.print(f"follow it:  farm status {result.job_id} --address {address}")
    out.print(f"stop it:    farm cancel {result.job_id} --address {address}")


def _run_summary(result: api.SubmitOutcome) -> dict:
    run = result.run
    return {
        "job_id": result.job_id,
        "tasks": len(result.plan.tasks),
        "already_done": _already_done(result),
        "rendered": run.succeeded if run else 0,
        "failed": run.failed if run else 0,
        "attempts": run.attempts if run else 0,
        "elapsed_s": round(run.elapsed_s, 2) if run else 0.0,
        "renderers": len(result.renderers),
        "state": run.state if run else "finished",
        "outputs": result.output,
        "catalog": result.catalog_root,
    }


def _already_done(result: api.SubmitOutcome) -> int:
    """Tasks done before this job rendered them: at plan time, adopted, or (a job that shared tasks
    with another running job) rendered by that job meanwhile."""
    before = len(result.plan.done) + result.recovered
    run = result.run
    if run is not None and run.state == "finished":
        return max(before, len(result.plan.tasks) - run.succeeded - run.failed)
    return before


def _print_run(result: api.SubmitOutcome, summary: dict) -> None:
    colour = "red" if summary["failed"] else "green"
    out.print(
        f"[{colour}]job {result.job_id}[/{colour}]: {summary['rendered']} rendered, "
        f"{summary['already_done']} already done, {summary['failed']} failed "
        f"in {format_duration(summary['elapsed_s'])} on {summary['renderers']} renderers"
    )
    out.print(f"videos:  {result.output}")
    out.print(f"catalog: {result.catalog_root}")
    if summary["failed"]:
        out.print(f"see the errors with: farm results {result.job_id} --status failed")


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name).")],
    address: Annotated[str | None, typer.Option(help="The Ray cluster the job runs on.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Stop a running job: nothing new is dispatched and running attempts stop within seconds.
    Submitting the manifest again resumes it."""
    from farm import api

    progress = api.cancel(job, address)
    if fmt is Format.json:
        print_json(progress)
        return
    out.print(
        f"job {progress['job_id']}: cancelling — {progress['succeeded']} done, {progress['in_flight']} "
        f"running attempts stop within seconds; submit the manifest again to resume"
    )
