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
succeeded attempt of it into the same output, no ``invalidated`` row names that attempt, and its
clip is still in the output with the size recorded (``farm/verify.py``: checked on every
resume). Readable as-is by duckdb, pandas and pyarrow (hive partitioning on ``job_id``). The
tables' columns are declared in ``records.py``. Schema history:
v1 (first release); v2 adds ``attempt_uid`` and ``storage`` (and the job's priority, timeout and
storage options); v3 the job's ``deadline_at``; v4 the attempt's ``error_kind``; v5 the render
settings ``precision``, ``cache``, ``compile`` and the attempt's ``run_variant`` and
``weights_identity``, and ``poster_bytes``, ``poster_sha256`` and ``invalidates``. Older files read
with the new columns as nulls (``tests/fixtures/catalog-v3`` is one written by v3).

A damaged file (torn by a full disk, a copy, a sync tool) never stops the farm: every reader skips
a file it cannot read, with one warning naming it; a catalog opened for writing
(``quarantine=True``: submit, verify --repair, compact, ``farm catalog check``) moves it to
``quarantine/`` and restores the attempt rows of a quarantined batch from the outputs' commit
markers (``farm/catalog_check.py``). Local files are fsynced before their rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
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
from farm.verify import VerifiedDone, success_key

if TYPE_CHECKING:
    import pyarrow.dataset as ds

log = logging.getLogger("farm.catalog")

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


class Catalog(VerifiedDone):
    """``quarantine``: this catalog is opened to write (submit, verify --repair, compact, check): a damaged
    file is moved to ``quarantine/`` (and a batch's rows restored from commit markers) instead of
    only skipped."""

    def __init__(self, location: str | os.PathLike, *, quarantine: bool = False) -> None:
        self.location = str(location)
        self.fs, self.base = catalog_filesystem(self.location)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self.quarantine = quarantine
        self.quarantined: list[str] = []  # files this object moved to quarantine/, as they were named
        self.restored_jobs: set[str] = set()  # jobs whose quarantined batches were restored from markers

    @property
    def root(self) -> str:
        return self.location

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    # --- files
    def _write(self, table: pa.Table, path: str) -> None:
        """Write a file whole or not at all: a full disk or a crash leaves no torn file (and no
        temporary one); the error is one line."""
        if not self._local:  # an S3 object becomes visible only once complete
            with self.fs.open_output_stream(path) as stream:
                pq.write_table(table, stream)
            return
        folder = os.path.dirname(path)
        temp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(temp, "wb") as fh:
                pq.write_table(table, fh)
                fh.flush()
                os.fsync(fh.fileno())  # the rename must never publish bytes still in the page cache
            os.replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise CatalogError(
                f"cannot write the catalog file {path}: {exc.strerror or exc}",
                hint="free space on its disk or fix its permissions (FARM_CATALOG / FARM_HOME); "
                "finished clips are kept and catalogued on the next submit",
            ) from None

    def _read(self, path: str, schema: pa.Schema) -> pa.Table | None:
        """A whole file, or None for a damaged one (skipped with a warning; quarantined when this
        catalog is opened to write)."""
        try:
            return pq.read_table(path, filesystem=self.fs, schema=schema)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:  # gone (S3 says so less plainly)
                raise FileNotFoundError(path) from None
            self._damaged(path, exc)
            return None

    def _damaged(self, path: str, exc: BaseException) -> None:
        from farm.catalog_check import handle_damaged

        handle_damaged(self, path, exc)

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

    def _live_files(self, folder: str) -> list[str]:
        files = self._files(folder)
        replaced = replaced_by_compaction(self, files)
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
            table = self._read(path, JOB_SCHEMA)
            if table is not None:
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
            from farm.catalog_check import damaged_job_error

            raise damaged_job_error(self, job_id) or CatalogError(
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
            table = self._read(path, TASK_SCHEMA)
        except (OSError, FileNotFoundError) as exc:
            raise CatalogError(
                f"job {job_id} has no task list in the catalog ({exc})", hint="submit the manifest again"
            ) from None
        if table is None:
            from farm.catalog_check import damaged_tasks_error

            raise damaged_tasks_error(self, job_id, path)
        return tasks_from_columns(table.to_pydict(), table.num_rows)

    def events(self, job_id: str) -> list[dict]:
        files = self._live_files(self._path("events", f"job_id={job_id}"))
        tables = [self._read(p, EVENT_SCHEMA) for p in files]
        rows = [r for t in tables if t is not None for r in t.to_pylist()]
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
        try:
            return self._attempt_dataset(files).to_table(columns=columns)
        except (pa.ArrowException, OSError, ValueError):  # a damaged file: only this path reads file by file
            from farm.catalog_check import readable_attempt_files

            return self._attempt_dataset(readable_attempt_files(self, files, folder)).to_table(columns=columns)

    def _attempt_dataset(self, files: list[str]) -> ds.Dataset:
        import pyarrow.dataset as ds  # imports pandas (~0.25 s): only commands that read attempts pay it

        return ds.dataset(
            files,
            filesystem=self.fs,
            schema=ATTEMPT_FULL_SCHEMA,  # columns missing from older files read as nulls
            format="parquet",
            partitioning=ds.partitioning(pa.schema([("job_id", pa.string())]), flavor="hive"),
            partition_base_dir=self._path("attempts"),
        )

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
            # A blocked task (never attempted: a task it depends on failed) did not make its clip either.
            failed=sum(r["status"] in (AttemptStatus.FAILED, AttemptStatus.BLOCKED) and r["final"] for r in made),
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
        names = ["task_id", "status", "final", "output_root", "job_id", "attempt_uid", "finished_at", "invalidates"]
        table = self.attempts(columns=names)
        cols = [table.column(c).to_pylist() for c in names]
        return [self._status(job, cols) for job in jobs]

    def _status(self, job: JobRecord, cols: list[list]) -> JobStatus:
        counts, attempts, rendered = _task_counts(job, cols)
        events = self.events(job.job_id)
        state = _job_state(events[-1]["event"] if events else JobEvent.SUBMITTED)
        return JobStatus(job, state, counts, attempts, rendered, events[-1]["at"] if events else None)

    def results(self, job: JobRecord, keep: ResultFilter | None = None) -> list[dict]:
        """One row per task of the job: its succeeded attempt (from any job), else its last attempt
        here; then filtered."""
        rows = self.attempts().to_pylist()
        best: dict[str, dict] = {}
        mine = set(job.task_ids)
        invalid = _invalidated(
            [r["status"] for r in rows], [r["output_root"] for r in rows], [r["invalidates"] for r in rows], job.output
        )
        for row in rows:
            task_id = row["task_id"]
            if task_id not in mine or (
                invalid and row["status"] == AttemptStatus.SUCCEEDED and success_key(row) in invalid
            ):
                continue  # a success whose output was found missing or changed is no result
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
        """Merge each job's attempt and event files into one file per partition (see
        ``catalog_check.compact``: safe to interrupt, and to run again)."""
        from farm.catalog_check import compact

        return compact(self, job_id)

    def _write_attempts(self, job_id: str, rows: list[dict]) -> None:
        """Attempt rows written here, not by a controller's writer: one new batch in the job's partition."""
        self._write(
            pa.Table.from_pylist(rows, schema=ATTEMPT_SCHEMA), self._path("attempts", f"job_id={job_id}", _part_name())
        )


def replaced_by_compaction(catalog: Catalog, files: list[str]) -> set[str]:
    """The files that compacted files among ``files`` replace (named in their schema metadata)."""
    replaced: set[str] = set()
    for path in files:
        if os.path.basename(path).startswith("compact-"):
            try:
                metadata = pq.read_schema(path, filesystem=catalog.fs).metadata or {}
            except (pa.ArrowException, OSError, ValueError) as exc:  # a torn compacted file
                catalog._damaged(path, exc)
                continue
            folder = path.rsplit("/", 1)[0]
            replaced.update(f"{folder}/{name}" for name in json.loads(metadata.get(_REPLACES, b"[]")))
    return replaced


def _invalidated(statuses: list, roots: list, invalidates: list, output_root: str) -> set[str]:
    """The succeeded attempts into ``output_root`` that invalidated rows name (``success_key``)."""
    return {
        key
        for status, root, key in zip(statuses, roots, invalidates, strict=True)
        if status == AttemptStatus.INVALIDATED and root == output_root and key
    }


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


def _task_counts(job: JobRecord, cols: list[list]) -> tuple[dict[str, int], int, int]:
    """A job's tasks by TaskStatus, its attempts, and the clips it rendered itself, from the
    attempts' columns (``Catalog.statuses``)."""
    mine = set(job.task_ids)
    done: set[str] = set()
    failed: set[str] = set()
    blocked: set[str] = set()
    attempts = rendered = 0
    invalid = _invalidated(cols[1], cols[3], cols[7], job.output)
    for task_id, status, final, root, job_id, uid, finished, _ in zip(*cols, strict=True):
        if task_id not in mine:
            continue
        if job_id == job.job_id and status not in (AttemptStatus.INVALIDATED, AttemptStatus.BLOCKED):
            attempts += 1
        key = success_key({"task_id": task_id, "attempt_uid": uid, "finished_at": finished}) if invalid else ""
        if status == AttemptStatus.SUCCEEDED and root == job.output and key not in invalid:
            done.add(task_id)
            rendered += job_id == job.job_id
        elif status == AttemptStatus.FAILED and final and job_id == job.job_id:
            failed.add(task_id)
        elif status == AttemptStatus.BLOCKED and job_id == job.job_id:
            blocked.add(task_id)
    failed -= done
    blocked -= done | failed
    counts = {
        TaskStatus.SUCCEEDED.value: len(done),
        TaskStatus.FAILED.value: len(failed),
        TaskStatus.PENDING.value: len(mine) - len(done) - len(failed) - len(blocked),
    }
    if blocked:  # only a job with a task graph has them
        counts[TaskStatus.BLOCKED.value] = len(blocked)
    return counts, attempts, rendered
