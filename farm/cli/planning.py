"""farm validate and farm plan: what a manifest holds and what submitting it would do. Render nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from farm.cli.common import Format, FormatOpt, ManifestArg, OutputOpt, app, format_duration, out, print_json

if TYPE_CHECKING:
    from farm import api


@app.command()
def validate(manifest: ManifestArg) -> None:
    """Check a manifest: schema, placeholders, sizes the model can take. Renders nothing."""
    from farm import api

    mf, count = api.validate(manifest)
    out.print(f"[green]ok[/green] {manifest}: campaign {mf.manifest.campaign}, {count} tasks, model {mf.model.spec}")


@app.command()
def plan(
    manifest: ManifestArg,
    output: OutputOpt = None,
    address: Annotated[str | None, typer.Option(help="Route against this Ray cluster's pools.")] = None,
    show: Annotated[int, typer.Option(help="List this many of the tasks that will render.")] = 10,
    cluster_config: Annotated[
        Path | None,
        typer.Option(help="Estimate for the pools of this cluster-launcher config (e.g. cluster.yaml), offline."),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Show what submitting a manifest would do: tasks, already done, to render, which pool each
    would go to, and per pool the workers, time and cost to render them (by the manifest's
    deadline, if it gives one)."""
    from farm import api

    p = api.plan(manifest, output, address=address, cluster_config=cluster_config)
    summary = _summary(manifest, p)
    if fmt is Format.json:
        summary["to_render_tasks"] = _tasks_json(p)
        print_json(summary)
        return
    _print_summary(summary)
    if p.scaling:
        _print_scaling(p)
    if summary["graph"] and show > 0:
        _print_graph(p, show)
    if p.to_render and show > 0:
        _print_tasks(p, show)


def _summary(manifest: Path, p: api.Plan) -> dict:
    from farm.models.variants import precision_counts  # loaded with api already

    mf = p.manifest
    return {
        "campaign": mf.manifest.campaign,
        "manifest": str(manifest),
        "model": mf.model.spec,
        "output": mf.target.uri,
        "tasks": len(p.tasks),
        "identical_collapsed": p.expanded - len(p.tasks),
        "already_done": len(p.done),
        "to_render": len(p.to_render),
        "max_attempts": mf.max_attempts,
        "priority": mf.manifest.priority,
        "routes": p.routes,
        "precision": precision_counts(p.to_render),  # the variant each task resolved to
        "deadline_s": round(p.deadline_s) if p.deadline_s is not None else None,
        "scaling": _scaling_dict(p.scaling),
        "graph": _graph_dict(p.tasks),
    }


def _graph_dict(tasks: list) -> dict | None:
    """Films, segments, keyframes and the depth of the task graph (None: no task waits on another)."""
    from farm.sequence.graph import graph_of

    graph = graph_of(tasks)
    if not graph.dependent:
        return None
    return {
        "films": len(graph.films),
        "segments": sum(len(f.segments) for f in graph.films),
        "keyframes": sum(len(f.keyframes) for f in graph.films),
        "depth": graph.depth,
        "waiting_on_others": graph.dependent,
    }


def _scaling_dict(scaling) -> dict | None:
    if scaling is None:
        return None
    reasons = {d.pool: d.reason for d in scaling.decisions}
    return {
        "reachable": scaling.reachable,
        "cost_dollars": round(scaling.cost_dollars, 2),
        "unroutable": scaling.unroutable,
        "pools": {
            e.pool: {
                "tasks": e.backlog,
                "workers": e.workers,
                "workers_needed": e.workers_needed,
                "finish_s": e.finish_s if e.finish_s != float("inf") else None,
                "cost_dollars": e.cost_dollars,
                "reachable": e.reachable,
                "reason": reasons[e.pool],
            }
            for e in scaling.estimates
        },
    }


def _tasks_json(p: api.Plan) -> list[dict]:
    return [
        {
            "task_id": t.task_id,
            "prompt": t.prompt,
            "seed": t.seed,
            "variant": t.variant_dict,
            "width": t.settings.width,
            "height": t.settings.height,
            "frames": t.settings.frames,
            "min_vram_gb": t.needs.min_vram_gb,
            "mode": t.mode.value,
            "inputs": [{"role": i.role.value, "uri": i.uri, "sha256": i.sha256} for i in t.inputs],
            "parents": list(t.parents),
        }
        for t in p.to_render
    ]


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if key == "scaling":
            continue
        if key == "graph":
            if value is None:
                continue
            value = (
                f"{value['films']} films of {value['segments']} segments and {value['keyframes']} keyframe stills, "
                f"depth {value['depth']} (tasks in the longest chain that waits on each other)"
            )
        if key == "routes":
            value = ", ".join(f"{n} tasks → pool {pool}" for pool, n in value.items()) or "nothing to route"
        if key == "deadline_s":
            key, value = (
                "deadline",
                (
                    "none"
                    if value is None
                    else f"in {format_duration(value)}"
                    if value >= 0
                    else f"passed {format_duration(-value)} ago: workers are sized as without one"
                ),
            )
        out.print(f"{key.replace('_', ' '):>20}: {value}", markup=False)


def _print_scaling(p: api.Plan) -> None:
    """Per pool with tasks to render: the workers, time and cost, then why that many workers."""
    assert p.scaling is not None  # called only for a plan with something to render
    table = Table(title="to render it" + (" by the deadline" if p.deadline_s is not None else ""))
    for column in ("pool", "tasks", "workers", "done in", "cost", ""):
        table.add_column(column)
    reasons = {d.pool: d.reason for d in p.scaling.decisions}
    for e in p.scaling.estimates:
        if e.backlog:
            table.add_row(
                e.pool,
                str(e.backlog),
                str(e.workers),
                format_duration(e.finish_s) if e.finish_s != float("inf") else "never",
                f"${e.cost_dollars:,.2f}",
                "" if e.reachable else "[red]misses the deadline[/red]",
            )
    out.print(table)
    for e in p.scaling.estimates:
        if e.backlog:
            out.print(f"  {e.pool}: {reasons[e.pool]}", markup=False, highlight=False)


def _print_graph(p: api.Plan, show: int) -> None:
    """Each film (the first ``show``): its parts in order and what each waits on."""
    from farm.sequence.graph import graph_of, part_label

    graph = graph_of(p.tasks)
    done = set(p.done)
    for film in graph.films[:show]:
        label = ", ".join(f"{k}={v}" for k, v in film.film.variant if k not in ("part", "shot"))
        table = Table(title=f"film {film.film.task_id[:12]} ({label or 'no variant'}): depth {film.depth}")
        for column in ("part", "task", "mode", "frames", "waits on", ""):
            table.add_column(column)
        names = {t.task_id: part_label(t.variant_dict) for t in (*film.keyframes, *film.segments, film.film)}
        for t in (*film.keyframes, *film.segments, film.film):
            waits = ", ".join(names.get(parent, parent[:12]) for parent in t.parents) or "-"
            table.add_row(
                names[t.task_id], t.task_id[:12], t.mode.value, str(t.settings.frames), waits,
                "done" if t.task_id in done else "",
            )  # fmt: skip
        out.print(table)
    if len(graph.films) > show:
        out.print(f"… and {len(graph.films) - show} more films", markup=False)


def _print_tasks(p: api.Plan, show: int) -> None:
    table = Table(title=f"first {min(show, len(p.to_render))} of {len(p.to_render)} to render")
    for column in ("task", "size", "seed", "prompt"):
        table.add_column(column)
    for t in p.to_render[:show]:
        s = t.settings
        table.add_row(t.task_id[:12], f"{s.width}x{s.height}x{s.frames}", str(t.seed), t.prompt)
    out.print(table)
