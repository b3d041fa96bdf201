"""The catalog: a Parquet dataset that records every job and every attempt.

Layout under the catalog root (``$FARM_HOME/catalog`` by default)::

    jobs/<job_id>.parquet                         one row per job: manifest, who, when, task ids
    events/job_id=<job_id>/<seq>-<uuid>.parquet   job lifecycle: submitted, finished, interrupted
    attempts/job_id=<job_id>/<seq>-<uuid>.parquet one row per attempt, written in batches

Files are written under a temporary name and renamed, so a reader never sees half a file and a
crash loses at most the batch not yet written. It is the source of truth for status, results
and resume: a task is done when any job has a succeeded attempt of it into the same output.
Readable as-is by duckdb, pandas and pyarrow (hive partitioning on ``job_id``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from farm.config import CATALOG_BATCH_ROWS, CATALOG_BATCH_SECONDS
from farm.errors import CatalogError
from farm.task import AttemptStatus, Result, Task, TaskStatus

SCHEMA_VERSION = 1
_TS = pa.timestamp("ms", tz="UTC")

ATTEMPT_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("attempt", pa.int32()),
        ("status", pa.string()),
        ("final", pa.bool_()),  # no further attempt of this task follows in this job
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("variant", pa.map_(pa.string(), pa.string())),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("model_identity", pa.string()),
        ("mode", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("frames", pa.int32()),
        ("fps", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("output_root", pa.string()),
        ("output_uri", pa.string()),
        ("poster_uri", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("load_s", pa.float64()),
        ("generate_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("write_s", pa.float64()),
        ("node_id", pa.string()),
        ("actor_id", pa.string()),
        ("error", pa.string()),
        ("recovered", pa.bool_()),  # adopted from the sink's commit marker after a driver crash
        ("started_at", _TS),
        ("finished_at", _TS),
        ("schema_version", pa.int16()),
    ]
)

ATTEMPT_FULL_SCHEMA = ATTEMPT_SCHEMA.append(pa.field("job_id", pa.string()))

JOB_SCHEMA = pa.schema(
    [
        ("job_id", pa.string()),
        ("campaign", pa.string()),
        ("submitted_at", _TS),
        ("user", pa.string()),
        ("host", pa.string()),
        ("manifest_path", pa.string()),
        ("manifest_sha256", pa.string()),
        ("manifest_yaml", pa.string()),
        ("model", pa.string()),
        ("output", pa.string()),
        ("max_attempts", pa.int32()),
        ("task_count", pa.int64()),
        ("task_ids", pa.list_(pa.string())),
        ("farm_version", pa.string()),
        ("schema_version", pa.int16()),
    ]
)

EVENT_SCHEMA = pa.schema([("event", pa.string()), ("at", _TS), ("detail", pa.string())])


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    campaign: str
    submitted_at: datetime
    user: str
    host: str
    manifest_path: str
    manifest_sha256: str
    manifest_yaml: str
    model: str
    output: str
    max_attempts: int
    task_ids: tuple[str, ...]
    farm_version: str

    @property
    def task_count(self) -> int:
        return len(self.task_ids)


@dataclass(frozen=True)
class JobStatus:
    job: JobRecord
    state: str  # last lifecycle event: submitted | finished | interrupted
    counts: dict[str, int]  # TaskStatus value → tasks
    attempts: int
    rendered: int  # succeeded attempts this job made itself (the rest were done before)
    last_event_at: datetime | None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def attempt_row(task: Task, result: Result, output_root: str, final: bool, recovered: bool = False) -> dict:
    s, t = task.settings, result.timings
    return {
        "task_id": task.task_id,
        "attempt": result.attempt,
        "status": result.status.value,
        "final": final,
        "prompt": task.prompt,
        "negative_prompt": s.negative_prompt,
        "variant": list(task.variant),
        "seed": task.seed,
        "model": task.model.spec,
        "model_identity": task.model.identity,
        "mode": task.mode,
        "width": s.width,
        "height": s.height,
        "frames": s.frames,
        "fps": s.fps,
        "steps": s.steps,
        "guidance": s.guidance,
        "output_root": output_root,
        "output_uri": result.output_uri,
        "poster_uri": result.poster_uri,
        "bytes": result.bytes,
        "sha256": result.sha256,
        "load_s": t.load_s,
        "generate_s": t.generate_s,
        "encode_s": t.encode_s,
        "write_s": t.write_s,
        "node_id": result.node_id,
        "actor_id": result.actor_id,
        "error": result.error,
        "recovered": recovered,
        "started_at": _utc(result.started_at or time.time()),
        "finished_at": _utc(result.finished_at or time.time()),
        "schema_version": SCHEMA_VERSION,
    }


def _write_atomic(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.tmp"
    pq.write_table(table, temp)
    os.replace(temp, target)


def _part_name() -> str:
    # Sortable by time, unique across writers.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


class Catalog:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def attempts_dir(self) -> Path:
        return self.root / "attempts"

    # --- jobs
    def record_job(self, job: JobRecord) -> None:
        row = {**job.__dict__, "task_ids": list(job.task_ids), "task_count": job.task_count,
               "schema_version": SCHEMA_VERSION}
        _write_atomic(pa.Table.from_pylist([row], schema=JOB_SCHEMA), self.root / "jobs" / f"{job.job_id}.parquet")
        self.record_event(job.job_id, "submitted")

    def record_event(self, job_id: str, event: str, detail: str = "") -> None:
        row = {"event": event, "at": datetime.now(UTC), "detail": detail}
        _write_atomic(pa.Table.from_pylist([row], schema=EVENT_SCHEMA),
                      self.root / "events" / f"job_id={job_id}" / _part_name())

    def jobs(self) -> list[JobRecord]:
        folder = self.root / "jobs"
        if not folder.is_dir():
            return []
        records = []
        for path in sorted(folder.glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                records.append(_job_from_row(row))
        return sorted(records, key=lambda j: j.submitted_at)

    def job(self, job_id: str) -> JobRecord:
        """A job by its id or a unique prefix of it; the newest of a campaign by campaign name."""
        jobs = self.jobs()
        exact = [j for j in jobs if j.job_id == job_id]
        if exact:
            return exact[0]
        newest_of_campaign = [j for j in jobs if j.campaign == job_id][-1:]
        matches = newest_of_campaign or [j for j in jobs if j.job_id.startswith(job_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CatalogError(f"no job {job_id!r} in the catalog at {self.root}",
                               hint="list jobs with 'farm jobs' (and check FARM_HOME)")
        raise CatalogError(f"job id {job_id!r} is ambiguous ({len(matches)} jobs start with it)",
                           hint="give more characters of the id")

    def events(self, job_id: str) -> list[dict]:
        folder = self.root / "events" / f"job_id={job_id}"
        if not folder.is_dir():
            return []
        rows = [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        return sorted(rows, key=lambda r: r["at"])

    # --- attempts
    def writer(self, job_id: str, batch_rows: int = CATALOG_BATCH_ROWS,
               batch_seconds: float = CATALOG_BATCH_SECONDS) -> AttemptWriter:
        return AttemptWriter(self.attempts_dir / f"job_id={job_id}", batch_rows, batch_seconds)

    def attempts(self, job_id: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Attempt rows (all jobs, or one), with a ``job_id`` column from the partition."""
        if not self.attempts_dir.is_dir():
            empty = ATTEMPT_FULL_SCHEMA.empty_table()
            return empty if columns is None else empty.select(columns)
        dataset = ds.dataset(
            self.attempts_dir,
            schema=ATTEMPT_FULL_SCHEMA,  # missing columns of older files read as nulls
            format="parquet",
            partitioning=ds.partitioning(pa.schema([("job_id", pa.string())]), flavor="hive"),
        )
        where = ds.field("job_id") == job_id if job_id else None
        return dataset.to_table(columns=columns, filter=where)

    def done(self, task_ids: Iterable[str], output_root: str) -> dict[str, str]:
        """task_id → output uri for the tasks that already have a succeeded attempt into this output."""
        wanted = set(task_ids)
        table = self.attempts(columns=["task_id", "status", "output_root", "output_uri"])
        out: dict[str, str] = {}
        for task_id, status, root, uri in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                              strict=True):
            if status == AttemptStatus.SUCCEEDED and root == output_root and task_id in wanted:
                out[task_id] = uri
        return out

    def status(self, job: JobRecord) -> JobStatus:
        return self.statuses([job])[0]

    def statuses(self, jobs: list[JobRecord]) -> list[JobStatus]:
        """Status of each job, reading the attempts once for all of them."""
        names = ["task_id", "status", "final", "output_root", "job_id"]
        table = self.attempts(columns=names)
        cols = [table.column(c).to_pylist() for c in names]
        return [self._status(job, cols) for job in jobs]

    def _status(self, job: JobRecord, cols: list[list]) -> JobStatus:
        mine = set(job.task_ids)
        done: set[str] = set()
        failed: set[str] = set()
        attempts = rendered = 0
        for task_id, status, final, root, job_id in zip(*cols, strict=True):
            if task_id not in mine:
                continue
            if job_id == job.job_id:
                attempts += 1
            if status == AttemptStatus.SUCCEEDED and root == job.output:
                done.add(task_id)
                rendered += job_id == job.job_id
            elif status == AttemptStatus.FAILED and final and job_id == job.job_id:
                failed.add(task_id)
        failed -= done
        counts = {
            TaskStatus.SUCCEEDED.value: len(done),
            TaskStatus.FAILED.value: len(failed),
            TaskStatus.PENDING.value: len(mine) - len(done) - len(failed),
        }
        events = self.events(job.job_id)
        state = events[-1]["event"] if events else "submitted"
        return JobStatus(job, state, counts, attempts, rendered, events[-1]["at"] if events else None)

    def results(self, job: JobRecord) -> list[dict]:
        """One row per task of the job: its succeeded attempt (from any job), else its last attempt here."""
        table = self.attempts()
        best: dict[str, dict] = {}
        mine = set(job.task_ids)
        for row in table.to_pylist():
            task_id = row["task_id"]
            if task_id not in mine:
                continue
            ok = row["status"] == AttemptStatus.SUCCEEDED and row["output_root"] == job.output
            if not ok and row["job_id"] != job.job_id:
                continue
            current = best.get(task_id)
            current_ok = current is not None and current["status"] == AttemptStatus.SUCCEEDED
            if current is None or (ok and not current_ok) or (
                ok == current_ok and row["finished_at"] > current["finished_at"]
            ):
                best[task_id] = row
        order = {t: i for i, t in enumerate(job.task_ids)}
        return sorted(best.values(), key=lambda r: order[r["task_id"]])


def _job_from_row(row: dict) -> JobRecord:
    fields = {k: row[k] for k in JobRecord.__dataclass_fields__ if k in row}
    fields["task_ids"] = tuple(row.get("task_ids") or ())
    return JobRecord(**fields)


class AttemptWriter:
    """Buffers attempt rows and writes them as one Parquet file per batch."""

    def __init__(self, folder: Path, batch_rows: int, batch_seconds: float) -> None:
        self.folder = folder
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self.written = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows or time.monotonic() - self._last_flush >= self.batch_seconds:
            self.flush()

    def maybe_flush(self) -> None:
        if self._rows and time.monotonic() - self._last_flush >= self.batch_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=ATTEMPT_SCHEMA)
        _write_atomic(table, self.folder / _part_name())
        self.written += len(self._rows)
        self._rows = []

    def __enter__(self) -> AttemptWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
