"""farm results: one row per task of a job, filtered, shown as a table or exported (csv, json, parquet).

To add a filter: an option on results(), passed on to ResultFilter in _filter()."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from farm.cli.common import ClusterOpt, app, err, out, stdout
from farm.errors import FarmError
from farm.task import AttemptStatus, FailureKind
from farm.timeparse import time_ago

if TYPE_CHECKING:
    from farm.catalog import ResultFilter


class ResultsFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


RESULT_COLUMNS = (
    "task_id",
    "status",
    "attempt",
    "seed",
    "width",
    "height",
    "frames",
    "bytes",
    "generate_s",
    "output_uri",
    "error_kind",
    "error",
)


@app.command()
def results(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or a campaign name).")],
    fmt: Annotated[
        ResultsFormat, typer.Option("--format", "-f", help="table, csv, json or parquet (parquet needs --out).")
    ] = ResultsFormat.table,
    status_filter: Annotated[
        AttemptStatus | None, typer.Option("--status", help="Only tasks whose last attempt ended this way.")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option("--where", help="Only rows whose variant has KEY=VALUE (repeatable).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Finished at or after: ISO time or age (30m, 2h, 7d).")] = None,
    until: Annotated[str | None, typer.Option(help="Finished at or before: ISO time or age.")] = None,
    error_kind: Annotated[
        FailureKind | None,
        typer.Option("--error-kind", help="Only tasks whose last attempt failed this way (e.g. storage, timeout)."),
    ] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    address: ClusterOpt = None,
) -> None:
    """One row per task of a job: its clip, or its last error. Filter, then show or export."""
    from farm import api

    keep = _filter(status_filter, where, since, until, error_kind)
    _, rows = api.results(job, keep, address=address)
    if fmt is ResultsFormat.parquet:
        _write_parquet(rows, out_path)
        return
    for r in rows:
        r["variant"] = dict(r["variant"] or [])
    if fmt is ResultsFormat.table:
        _print_table(rows)
        return
    text = json.dumps(rows, indent=2, default=str) + "\n" if fmt is ResultsFormat.json else _csv(rows)
    if out_path is None:
        stdout.write(text)
    else:
        out_path.write_text(text)
        err.print(f"{len(rows)} rows written to {out_path}")


def _filter(
    status: str | None, where: list[str] | None, since: str | None, until: str | None, error_kind: str | None
) -> ResultFilter:
    """The catalog filter for results' options (a FarmError for a malformed one)."""
    from farm.catalog import ResultFilter

    return ResultFilter(status, _where(where or []), _when(since, "--since"), _when(until, "--until"), error_kind)


def _when(value: str | None, option: str) -> datetime | None:
    """An age before now (30m, 2h, 1h30m, 7d) or an ISO time (UTC unless it says): timeparse's grammar."""
    if not value:
        return None
    try:
        return time_ago(value, datetime.now(UTC))
    except ValueError as exc:
        raise FarmError(str(exc), field=option) from None


def _where(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FarmError(f"{pair!r} is not KEY=VALUE", field="--where", hint="e.g. --where product=shoe")
        parsed.append((key.strip(), value.strip()))
    return tuple(parsed)


def _write_parquet(rows: list[dict], out_path: Path | None) -> None:
    if out_path is None:
        raise FarmError("parquet needs a file", field="--format", hint="add --out results.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from farm.catalog import ATTEMPT_FULL_SCHEMA

    pq.write_table(pa.Table.from_pylist(rows, schema=ATTEMPT_FULL_SCHEMA), out_path)
    err.print(f"{len(rows)} rows written to {out_path}")


def _print_films(rows: list[dict]) -> set[str]:
    """Each stitched film, then its segments in order with their seams. Returns the task ids shown."""
    from farm.sequence.graph import part_label

    by_id = {r["task_id"]: r for r in rows}
    shown: set[str] = set()
    for film in (r for r in rows if r["mode"] == "stitch"):
        variant = ", ".join(f"{k}={v}" for k, v in film["variant"].items() if k not in ("part", "shot"))
        seams = film.get("seam_scores") or []
        table = Table(title=f"film {film['task_id'][:12]} ({variant or 'no variant'}): {film['status']}")
        for column in ("part", "task", "status", "frames", "seam", "output / error"):
            table.add_column(column)
        parts = [by_id[p] for p in film["parents"] or () if p in by_id]
        keys = [by_id[p] for s in parts for p in s["parents"] or () if p in by_id and p not in film["parents"]]
        for r in [*dict((k["task_id"], k) for k in keys).values(), *parts, film]:
            seam = r.get("seam_score")
            seam_text = f"{seam:.2f}" if seam is not None else ""
            if r is film:
                seam_text = " ".join(f"{x:.2f}" for x in seams)
            table.add_row(
                part_label(r["variant"]), r["task_id"][:12], r["status"], str(r["frames"]), seam_text,
                r["output_uri"] if r["status"] == "succeeded" else r["error"],
            )  # fmt: skip
            shown.add(r["task_id"])
        out.print(table)
    return shown


def _print_table(rows: list[dict]) -> None:
    shown = _print_films(rows)
    rows = [r for r in rows if r["task_id"] not in shown]
    if shown and not rows:
        return
    table = Table()
    for column in ("task", "status", "try", "variant", "seed", "size", "output / error"):
        table.add_column(column)
    for r in rows:
        variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items())
        detail = r["output_uri"] if r["status"] == "succeeded" else r["error"]
        table.add_row(
            r["task_id"][:12],
            r["status"],
            str(r["attempt"]),
            variant,
            str(r["seed"]),
            f"{r['width']}x{r['height']}x{r['frames']}",
            detail,
        )
    out.print(table)


def _csv(rows: list[dict]) -> str:
    """The RESULT_COLUMNS, prompt and finish time, then one column per variant key."""
    buffer = io.StringIO()
    variant_keys = sorted({k for r in rows for k in r["variant"]})
    writer = csv.writer(buffer)
    writer.writerow([*RESULT_COLUMNS, "prompt", "finished_at", *variant_keys])
    for r in rows:
        writer.writerow(
            [r[c] for c in RESULT_COLUMNS]
            + [r["prompt"], r["finished_at"].isoformat()]
            + [r["variant"].get(k, "") for k in variant_keys]
        )
    return buffer.getvalue()
