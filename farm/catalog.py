"""The catalog: a Parquet dataset that records every job and every attempt.

It lives on local disk or on S3 (``FARM_CATALOG=s3://bucket/prefix``), through pyarrow's
filesystem layer. Layout under its root::

    jobs/<job_id>.parquet                         one row per job: manifest, who, when, task ids
    events/job_id=<job_id>/<seq>-<uuid>.parquet   job lifecycle: submitted, finished, interrupted
    attempts/job_id=<job_id>/<seq>-<uuid>.parquet one row per attempt, written in batches

Local files are written under a temporary name and renamed; S3 objects appear whole. A reader
never sees half a file and a crash loses at most the batch not yet written. ``compact`` merges a
job's small batch files into one; the merged file names the files it replaces, so a compaction
interrupted at any point loses no row and shows none twice, and running it again finishes it.

It is the source of truth for status, results and resume: a task is done when any job has a
succeeded attempt of it into the same output. Readable as-is by duckdb, pandas and pyarrow (hive
partitioning on ``job_id``). The tables' columns are declared in ``records.py``. Schema history:
v1 (first release); v2 adds ``attempt_uid`` and ``storage`` (and the job's priority, timeout and
storage options); v3 the job's ``deadline_at``; v4 the attempt's ``error_kind``. Older files read
with the new columns as nulls (``tests/fixtures/catalog-v3`` is one written by v3).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from farm.config import CATALOG_BATCH_ROWS, CATALOG_BATCH_SECONDS
from farm.errors import CatalogError
from farm.records import (
    ATTEMPT_COLUMNS,
    ATTEMPT_FULL_COLUMNS,
    EVENT_COLUMNS,
    JOB_COLUMNS,
    TASK_COLUMNS,
    JobRecord,
    arrow_schema,
    job_from_row,
    job_row,
    task_row,
    tasks_from_columns,
)
from farm.task import AttemptStatus, JobEvent, JobState, StorageKind, Task, TaskStatus

_REPLACES = b"farm.replaces"  # schema metadata of a compacted file: the files it replaces

# Derived from the declarations in records.py; nothing here lists a column.
ATTEMPT_SCHEMA = arrow_schema(ATTEMPT_COLUMNS)
ATTEMPT_FULL_SCHEMA = arrow_schema(ATTEMPT_FULL_COLUMNS)
JOB_SCHEMA = arrow_schema(JOB_COLUMNS)
TASK_SCHEMA = arrow_schema(TASK_COLUMNS)
EVENT_SCHEMA = arrow_schema(EVENT_COLUMNS)


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
    recovered: int = 0  # finished clips found in the output whose catalog row was missing, adopted


@dataclass(frozen=True)
class JobStatus:
    job: JobRecord
    state: JobState  # from the last lifecycle event
    counts: dict[str, int]  # TaskStatus value → tasks
    attempts: int
    rendered: int  # succeeded attempts this job made itself (the rest were done before)
    last_event_at: datetime | None


@dataclass(frozen=True)
class ResultFilter:
    """Which result rows to keep: by status, by variant values (all must match), by finish time,
    by failure kind."""

    status: str | None = None
    variant: tuple[tuple[str, str], ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    error_kind: str | None = None  # a FailureKind: why the task's last attempt failed

    def keep(self, row: dict) -> bool:
        if self.status and row["status"] != self.status:
            return False
        if self.error_kind and row.get("error_kind") != self.error_kind:
            return False
        values = dict(row["variant"] or [])
        if any(values.get(k) != v for k, v in self.variant):
            return False
        finished = row["finished_at"]
        return not ((self.since and finished < self.since) or (self.until and finished > self.until))


@dataclass(frozen=True)
class CompactionReport:
    partitions: int  # job partitions looked at
    merged_files: int  # small files folded into compacted ones
    written_files: int
    rows: int  # rows in the compacted files written
    finished_deletes: int  # files a previous, interrupted compaction had left to delete


def _part_name(prefix: str = "") -> str:
    # Sortable by time, unique across writers.
    return f"{prefix}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


def catalog_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and base path for a catalog location (a local path or s3://…).

    S3 settings come from the standard AWS environment (AWS_ENDPOINT_URL[_S3], AWS_REGION,
    AWS_PROFILE, credentials), the same chain boto3 uses for outputs.
    """
    if StorageKind.of(location) is StorageKind.S3:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**kwargs), location[len("s3://") :].rstrip("/")
    if "://" in location:
        raise CatalogError(f"catalog {location}: unsupported scheme", hint="use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


class Catalog:
    def __init__(self, location: str | os.PathLike) -> None:
        self.location = str(location)
        self.fs, self.base = catalog_filesystem(self.location)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def root(self) -> str:
        return self.location

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    # --- files
    def _write(self, table: pa.Table, path: str) -> None:
        if self._local:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            temp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            pq.write_table(table, temp)
            os.replace(temp, path)
        else:  # an S3 object becomes visible only once complete
            with self.fs.open_output_stream(path) as stream:
                pq.write_table(table, stream)

    def _delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def _files(self, folder: str) -> list[str]:
        """Parquet files under ``folder`` (recursively), in name (= time) order, temp files excluded."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise CatalogError(
                f"cannot list the catalog at {self.location}: {exc}",
                hint="check FARM_CATALOG and the storage's credentials",
            ) from None
        files = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not i.base_name.startswith((".", "_"))
        ]
        return sorted(files, key=lambda p: (p.rsplit("/", 1)[0], p.rsplit("/", 1)[-1]))

    def _replaced_by_compaction(self, files: list[str]) -> set[str]:
        replaced: set[str] = set()
        for path in files:
            if os.path.basename(path).startswith("compact-"):
                metadata = pq.read_schema(path, filesystem=self.fs).metadata or {}
                folder = path.rsplit("/", 1)[0]
                replaced.update(f"{folder}/{name}" for name in json.loads(metadata.get(_REPLACES, b"[]")))
        return replaced

    def _live_files(self, folder: str) -> list[str]:
        files = self._files(folder)
        replaced = self._replaced_by_compaction(files)
        return [f for f in files if f not in replaced]

    # --- jobs
    def record_job(self, job: JobRecord) -> None:
        self._write(
            pa.Table.from_pylist([job_row(job)], schema=JOB_SCHEMA), self._path("jobs", f"{job.job_id}.parquet")
        )
        self.record_event(job.job_id, JobEvent.SUBMITTED)

    def record_event(self, job_id: str, event: JobEvent, detail: str = "") -> None:
        row = {"event": JobEvent(event).value, "at": datetime.now(UTC), "detail": detail}
        self._write(
            pa.Table.from_pylist([row], schema=EVENT_SCHEMA), self._path("events", f"job_id={job_id}", _part_name())
        )

    def jobs(self) -> list[JobRecord]:
        records: list[JobRecord] = []
        for path in self._files(self._path("jobs")):
            table = pq.read_table(path, filesystem=self.fs, schema=JOB_SCHEMA)
            records.extend(job_from_row(row) for row in table.to_pylist())
        return sorted(records, key=lambda j: j.submitted_at)

    def job(self, job_id: str) -> JobRecord:
        """A job by its id, the newest of a campaign by campaign name, or a unique id prefix."""
        jobs = self.jobs()
        exact = [j for j in jobs if j.job_id == job_id]
        if exact:
            return exact[0]
        newest_of_campaign = [j for j in jobs if j.campaign == job_id][-1:]
        matches = newest_of_campaign or [j for j in jobs if j.job_id.startswith(job_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CatalogError(
                f"no job {job_id!r} in the catalog at {self.location}",
                hint="list jobs with 'farm jobs' (and check FARM_HOME / FARM_CATALOG)",
            )
        raise CatalogError(
            f"job id {job_id!r} is ambiguous ({len(matches)} jobs start with it)", hint="give more characters of the id"
        )

    def record_tasks(self, job_id: str, tasks: list[Task]) -> None:
        """Every task of a job, as the controller needs it to run (or re-run after a restart)."""
        rows = [task_row(t) for t in tasks]
        self._write(
            pa.Table.from_pylist(rows, schema=TASK_SCHEMA), self._path("tasks", f"job_id={job_id}", "tasks.parquet")
        )

    def tasks(self, job_id: str) -> list[Task]:
        path = self._path("tasks", f"job_id={job_id}", "tasks.parquet")
        try:
            table = pq.read_table(path, filesystem=self.fs, schema=TASK_SCHEMA)
        except (OSError, FileNotFoundError) as exc:
            raise CatalogError(
                f"job {job_id} has no task list in the catalog ({exc})", hint="submit the manifest again"
            ) from None
        return tasks_from_columns(table.to_pydict(), table.num_rows)

    def events(self, job_id: str) -> list[dict]:
        files = self._live_files(self._path("events", f"job_id={job_id}"))
        rows = [r for p in files for r in pq.read_table(p, filesystem=self.fs, schema=EVENT_SCHEMA).to_pylist()]
        return sorted(rows, key=lambda r: r["at"])

    # --- attempts
    def writer(
        self, job_id: str, batch_rows: int = CATALOG_BATCH_ROWS, batch_seconds: float = CATALOG_BATCH_SECONDS
    ) -> AttemptWriter:
        return AttemptWriter(self, self._path("attempts", f"job_id={job_id}"), batch_rows, batch_seconds)

    def attempts(self, job_id: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Attempt rows (all jobs, or one), with a ``job_id`` column from the partition."""
        folder = self._path("attempts") if job_id is None else self._path("attempts", f"job_id={job_id}")
        files = self._live_files(folder)
        if not files:
            empty = ATTEMPT_FULL_SCHEMA.empty_table()
            return empty if columns is None else empty.select(columns)
        dataset = ds.dataset(
            files,
            filesystem=self.fs,
            schema=ATTEMPT_FULL_SCHEMA,  # columns missing from older files read as nulls
            format="parquet",
            partitioning=ds.partitioning(pa.schema([("job_id", pa.string())]), flavor="hive"),
            partition_base_dir=self._path("attempts"),
        )
        return dataset.to_table(columns=columns)

    def done(self, task_ids: Iterable[str], output_root: str) -> dict[str, str]:
        """task_id → output uri for the tasks that already have a succeeded attempt into this output."""
        wanted = set(task_ids)
        table = self.attempts(columns=["task_id", "status", "output_root", "output_uri"])
        out: dict[str, str] = {}
        for task_id, status, root, uri in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            if status == AttemptStatus.SUCCEEDED and root == output_root and task_id in wanted:
                out[task_id] = uri
        return out

    def run_summary(self, job_id: str, elapsed_s: float, state: str) -> RunSummary:
        """What a job's own attempts did (clips adopted from an earlier run are not counted)."""
        rows = self.attempts(
            job_id,
            columns=["status", "final", "recovered", "generate_s", "encode_s", "write_s", "started_at", "finished_at"],
        ).to_pylist()
        made = [r for r in rows if not r["recovered"]]
        if made:  # the rendering makespan: first attempt's start to last attempt's end
            elapsed_s = (max(r["finished_at"] for r in made) - min(r["started_at"] for r in made)).total_seconds()
        return RunSummary(
            succeeded=sum(r["status"] == "succeeded" for r in made),
            failed=sum(r["status"] == AttemptStatus.FAILED and r["final"] for r in made),
            attempts=sum(r["status"] in (AttemptStatus.SUCCEEDED, AttemptStatus.FAILED) for r in made),
            interrupted=sum(r["status"] == AttemptStatus.INTERRUPTED for r in made),
            elapsed_s=elapsed_s,
            busy_s=sum((r["generate_s"] or 0) + (r["encode_s"] or 0) + (r["write_s"] or 0) for r in made),
            state=state,
            recovered=len(rows) - len(made),
        )

    def mean_clip_seconds(self, model_identity: str) -> float | None:
        """Mean render + encode + write seconds of this model's clips rendered so far (None: none yet)."""
        table = self.attempts(columns=["model_identity", "status", "recovered", "generate_s", "encode_s", "write_s"])
        total, clips = 0.0, 0
        for model, status, recovered, *seconds in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            if model == model_identity and status == AttemptStatus.SUCCEEDED and not recovered:
                total += sum(x or 0.0 for x in seconds)
                clips += 1
        return total / clips if clips else None

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
        state = _job_state(events[-1]["event"] if events else JobEvent.SUBMITTED)
        return JobStatus(job, state, counts, attempts, rendered, events[-1]["at"] if events else None)

    def results(self, job: JobRecord, keep: ResultFilter | None = None) -> list[dict]:
        """One row per task of the job: its succeeded attempt (from any job), else its last attempt
        here; then filtered."""
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
            if (
                current is None
                or (ok and not current_ok)
                or (ok == current_ok and row["finished_at"] > current["finished_at"])
            ):
                best[task_id] = row
        order = {t: i for i, t in enumerate(job.task_ids)}
        rows = sorted(best.values(), key=lambda r: order[r["task_id"]])
        return [r for r in rows if keep is None or keep.keep(r)]

    # --- maintenance
    def compact(self, job_id: str | None = None) -> CompactionReport:
        """Merge each job's attempt and event files into one file per partition.

        Order of work, so that an interruption anywhere is harmless: (1) delete files that an
        earlier compacted file already replaces, (2) write the new compacted file naming every
        file it replaces, (3) delete those files.
        """
        partitions = merged = written = rows = finished = 0
        for kind in ("attempts", "events"):
            schema = ATTEMPT_SCHEMA if kind == "attempts" else EVENT_SCHEMA
            folders = sorted({f.rsplit("/", 1)[0] for f in self._files(self._path(kind))})
            if job_id:
                folders = [f for f in folders if f.endswith(f"/job_id={job_id}")]
            for folder in folders:
                partitions += 1
                files = self._files(folder)
                replaced = self._replaced_by_compaction(files)
                for path in sorted(replaced & set(files)):
                    self._delete(path)
                    finished += 1
                live = [f for f in files if f not in replaced]
                if len(live) < 2:
                    continue
                table = pa.concat_tables(pq.read_table(f, filesystem=self.fs, schema=schema) for f in live)
                names = sorted(os.path.basename(f) for f in live) + sorted(os.path.basename(f) for f in replaced)
                table = table.replace_schema_metadata({_REPLACES: json.dumps(names).encode()})
                self._write(table, f"{folder}/{_part_name('compact-')}")
                for path in live:
                    self._delete(path)
                merged += len(live)
                written += 1
                rows += table.num_rows
        return CompactionReport(partitions, merged, written, rows, finished)


def _job_state(event: str) -> JobState:
    """A job's state from its last event (an admitted job is running)."""
    return JobState.RUNNING if event == JobEvent.ADMITTED else JobState(event)


class AttemptWriter:
    """Buffers attempt rows and writes them as one Parquet file per batch."""

    def __init__(self, catalog: Catalog, folder: str, batch_rows: int, batch_seconds: float) -> None:
        self.catalog = catalog
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
        self.catalog._write(table, f"{self.folder}/{_part_name()}")
        self.written += len(self._rows)
        self._rows = []

    def __enter__(self) -> AttemptWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
