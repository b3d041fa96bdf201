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
partitioning on ``job_id``). Schema history: v1 (first release); v2 adds ``attempt_uid`` and
``storage``. Older files read with the new columns as nulls.
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
from farm.task import AttemptStatus, ModelRef, RenderSettings, Requirements, Result, Task, TaskStatus

SCHEMA_VERSION = 3  # v2: attempt_uid, storage, job priority/timeout/storage; v3: job deadline_at
_TS = pa.timestamp("ms", tz="UTC")
_REPLACES = b"farm.replaces"  # schema metadata of a compacted file: the files it replaces

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
        # v2
        ("attempt_uid", pa.string()),  # unique per attempt row, for tools that join or dedupe
        ("storage", pa.string()),  # "local" | "s3"
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
        # v2: what the controller needs to run the job, also after it restarts
        ("priority", pa.int32()),
        ("timeout_s", pa.float64()),
        ("storage_json", pa.string()),  # StorageOptions of the output, never credentials
        # v3: when the job should be done (manifest deadline:); null without one
        ("deadline_at", _TS),
    ]
)

TASK_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("mode", pa.string()),
        ("source", pa.string()),
        ("variant", pa.map_(pa.string(), pa.string())),
        ("model_spec", pa.string()),
        ("model_kind", pa.string()),
        ("model_location", pa.string()),
        ("model_identity", pa.string()),
        ("model_family", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("frames", pa.int32()),
        ("fps", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("negative_prompt", pa.string()),
        ("min_vram_gb", pa.float64()),
        ("gpu_type", pa.string()),
        ("pool", pa.string()),
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
    priority: int = 0
    timeout_s: float = 600.0
    storage_json: str = "{}"
    deadline_at: datetime | None = None

    @property
    def task_count(self) -> int:
        return len(self.task_ids)


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
    state: str  # last lifecycle event: submitted | finished | interrupted
    counts: dict[str, int]  # TaskStatus value → tasks
    attempts: int
    rendered: int  # succeeded attempts this job made itself (the rest were done before)
    last_event_at: datetime | None


@dataclass(frozen=True)
class ResultFilter:
    """Which result rows to keep: by status, by variant values (all must match), by finish time."""

    status: str | None = None
    variant: tuple[tuple[str, str], ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def keep(self, row: dict) -> bool:
        if self.status and row["status"] != self.status:
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
        "attempt_uid": uuid.uuid4().hex,
        "storage": "s3" if output_root.startswith("s3://") else "local",
    }


def _part_name(prefix: str = "") -> str:
    # Sortable by time, unique across writers.
    return f"{prefix}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


def catalog_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and base path for a catalog location (a local path or s3://…).

    S3 settings come from the standard AWS environment (AWS_ENDPOINT_URL[_S3], AWS_REGION,
    AWS_PROFILE, credentials), the same chain boto3 uses for outputs.
    """
    if location.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**kwargs), location[len("s3://"):].rstrip("/")
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
            raise CatalogError(f"cannot list the catalog at {self.location}: {exc}",
                               hint="check FARM_CATALOG and the storage's credentials") from None
        files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                 and not i.base_name.startswith((".", "_"))]
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
        row = {**job.__dict__, "task_ids": list(job.task_ids), "task_count": job.task_count,
               "schema_version": SCHEMA_VERSION}
        self._write(pa.Table.from_pylist([row], schema=JOB_SCHEMA), self._path("jobs", f"{job.job_id}.parquet"))
        self.record_event(job.job_id, "submitted")

    def record_event(self, job_id: str, event: str, detail: str = "") -> None:
        row = {"event": event, "at": datetime.now(UTC), "detail": detail}
        self._write(pa.Table.from_pylist([row], schema=EVENT_SCHEMA),
                    self._path("events", f"job_id={job_id}", _part_name()))

    def jobs(self) -> list[JobRecord]:
        records = []
        for path in self._files(self._path("jobs")):
            table = pq.read_table(path, filesystem=self.fs, schema=JOB_SCHEMA)
            records.extend(_job_from_row(row) for row in table.to_pylist())
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
            raise CatalogError(f"no job {job_id!r} in the catalog at {self.location}",
                               hint="list jobs with 'farm jobs' (and check FARM_HOME / FARM_CATALOG)")
        raise CatalogError(f"job id {job_id!r} is ambiguous ({len(matches)} jobs start with it)",
                           hint="give more characters of the id")

    def record_tasks(self, job_id: str, tasks: list[Task]) -> None:
        """Every task of a job, as the controller needs it to run (or re-run after a restart)."""
        rows = [{
            "task_id": t.task_id, "prompt": t.prompt, "seed": t.seed, "mode": t.mode, "source": t.source,
            "variant": list(t.variant), "model_spec": t.model.spec, "model_kind": t.model.kind,
            "model_location": t.model.location, "model_identity": t.model.identity, "model_family": t.model.family,
            **{k: getattr(t.settings, k) for k in ("width", "height", "frames", "fps", "steps", "guidance",
                                                   "negative_prompt")},
            "min_vram_gb": t.needs.min_vram_gb, "gpu_type": t.needs.gpu_type, "pool": t.needs.pool,
        } for t in tasks]
        self._write(pa.Table.from_pylist(rows, schema=TASK_SCHEMA),
                    self._path("tasks", f"job_id={job_id}", "tasks.parquet"))

    def tasks(self, job_id: str) -> list[Task]:
        path = self._path("tasks", f"job_id={job_id}", "tasks.parquet")
        try:
            table = pq.read_table(path, filesystem=self.fs, schema=TASK_SCHEMA)
        except (OSError, FileNotFoundError) as exc:
            raise CatalogError(f"job {job_id} has no task list in the catalog ({exc})",
                               hint="submit the manifest again") from None
        columns = {name: table.column(name).to_pylist() for name in TASK_SCHEMA.names}
        models: dict[tuple, ModelRef] = {}
        out = []
        for i in range(table.num_rows):
            c = {name: values[i] for name, values in columns.items()}
            key = (c["model_spec"], c["model_kind"], c["model_location"], c["model_identity"], c["model_family"])
            model = models.setdefault(key, ModelRef(*key))
            settings = RenderSettings(c["width"], c["height"], c["frames"], c["fps"], c["steps"], c["guidance"],
                                      c["negative_prompt"] or "")
            out.append(Task(c["task_id"], c["prompt"], c["seed"], model, settings, tuple(c["variant"] or ()),
                            c["mode"], c["source"] or "", Requirements(c["min_vram_gb"] or 0.0, c["gpu_type"],
                                                                       c["pool"])))
        return out

    def events(self, job_id: str) -> list[dict]:
        files = self._live_files(self._path("events", f"job_id={job_id}"))
        rows = [r for p in files for r in pq.read_table(p, filesystem=self.fs, schema=EVENT_SCHEMA).to_pylist()]
        return sorted(rows, key=lambda r: r["at"])

    # --- attempts
    def writer(self, job_id: str, batch_rows: int = CATALOG_BATCH_ROWS,
               batch_seconds: float = CATALOG_BATCH_SECONDS) -> AttemptWriter:
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
        for task_id, status, root, uri in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                              strict=True):
            if status == AttemptStatus.SUCCEEDED and root == output_root and task_id in wanted:
                out[task_id] = uri
        return out

    def run_summary(self, job_id: str, elapsed_s: float, state: str) -> RunSummary:
        """What a job's own attempts did (clips adopted from an earlier run are not counted)."""
        rows = self.attempts(job_id, columns=["status", "final", "recovered", "generate_s", "encode_s",
                                               "write_s", "started_at", "finished_at"]).to_pylist()
        made = [r for r in rows if not r["recovered"]]
        if made:  # the rendering makespan: first attempt's start to last attempt's end
            elapsed_s = (max(r["finished_at"] for r in made) - min(r["started_at"] for r in made)).total_seconds()
        return RunSummary(
            succeeded=sum(r["status"] == "succeeded" for r in made),
            failed=sum(r["status"] == "failed" and r["final"] for r in made),
            attempts=sum(r["status"] in ("succeeded", "failed") for r in made),
            interrupted=sum(r["status"] == "interrupted" for r in made),
            elapsed_s=elapsed_s,
            busy_s=sum((r["generate_s"] or 0) + (r["encode_s"] or 0) + (r["write_s"] or 0) for r in made),
            state=state,
            recovered=len(rows) - len(made),
        )

    def mean_clip_seconds(self, model_identity: str) -> float | None:
        """Mean render + encode + write seconds of this model's clips rendered so far (None: none yet)."""
        table = self.attempts(columns=["model_identity", "status", "recovered", "generate_s", "encode_s", "write_s"])
        total, clips = 0.0, 0
        for model, status, recovered, *seconds in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                                      strict=True):
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
        state = events[-1]["event"] if events else "submitted"
        state = "running" if state == "admitted" else state
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
            if current is None or (ok and not current_ok) or (
                ok == current_ok and row["finished_at"] > current["finished_at"]
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
                names = sorted(os.path.basename(f) for f in live) + sorted(
                    os.path.basename(f) for f in replaced)
                table = table.replace_schema_metadata({_REPLACES: json.dumps(names).encode()})
                self._write(table, f"{folder}/{_part_name('compact-')}")
                for path in live:
                    self._delete(path)
                merged += len(live)
                written += 1
                rows += table.num_rows
        return CompactionReport(partitions, merged, written, rows, finished)


def _job_from_row(row: dict) -> JobRecord:
    fields = {k: row[k] for k in JobRecord.__dataclass_fields__ if k in row and row[k] is not None}
    fields["task_ids"] = tuple(row.get("task_ids") or ())
    return JobRecord(**fields)


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
