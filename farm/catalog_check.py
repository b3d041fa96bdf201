"""Damaged catalog files: skipped by readers, quarantined by writers, listed by ``farm catalog check``.

A catalog file can be torn outside farm's control (a full disk before farm fsynced, a copy to a
NAS, a sync tool). Policy:
- a reader that cannot read a file skips it and says so once per process, in one line naming it;
- a catalog opened to write (``Catalog(..., quarantine=True)``) moves it to
  ``<catalog>/quarantine/<its path>`` (never deleted: it may be worth a look);
- a quarantined attempt batch's succeeded rows are restored from the commit markers in the job's
  output (``<task_id>.json``, written last, after the clip): a row ``recovered = true`` for each
  task of the job with a marker whose clip matches its checksum and no valid succeeded row left.
  Failed attempts in the batch are lost (no marker records them): the task is simply not done;
- a quarantined job record or task list cannot be rebuilt from anything else: the error that
  names the job says to submit its manifest again, which writes a new job and task list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from farm.catalog import (
    _REPLACES,
    ATTEMPT_SCHEMA,
    EVENT_SCHEMA,
    Catalog,
    CompactionReport,
    _part_name,
    replaced_by_compaction,
)
from farm.errors import CatalogError
from farm.records import attempt_row
from farm.storage import OutputTarget, StorageOptions, open_sink
from farm.verify import valid_successes

log = logging.getLogger("farm.catalog")

QUARANTINE = "quarantine"
_TABLES = ("jobs", "tasks", "events", "attempts")
_warned: set[tuple[str, str]] = set()  # (catalog, file) already reported by this process


@dataclass(frozen=True)
class DamagedFile:
    path: str
    error: str
    quarantined_to: str | None  # None: only listed (--dry-run)


@dataclass(frozen=True)
class CheckReport:
    files: int  # catalog files read whole
    damaged: list[DamagedFile] = field(default_factory=list)
    restored_rows: int = 0  # attempt rows restored from commit markers


def _reason(exc: BaseException) -> str:
    """The gist of a read error, without the path Arrow repeats in it (the warning names the file)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^Could not open Parquet input source '[^']*': ", "", text)[:160]


def handle_damaged(catalog: Catalog, path: str, exc: BaseException) -> None:
    """What a reader does with a file it cannot read: one warning, and quarantine when writing."""
    moved = quarantine_file(catalog, path) if catalog.quarantine else None
    if (catalog.location, path) in _warned and moved is None:
        return
    _warned.add((catalog.location, path))
    if moved:
        log.warning("damaged catalog file %s (%s) moved to %s", path, _reason(exc), moved)
    else:
        log.warning("skipped damaged catalog file %s (%s); 'farm catalog check' quarantines it", path, _reason(exc))


def quarantine_file(catalog: Catalog, path: str) -> str | None:
    """Move a catalog file to ``quarantine/`` under the same relative path (suffixed if that is
    taken). Returns where it went; None if it could not be moved (it stays skipped)."""
    relative = path[len(catalog.base) + 1 :] if path.startswith(catalog.base + "/") else os.path.basename(path)
    target = "/".join([catalog.base, QUARANTINE, relative])
    if catalog.fs.get_file_info(target).type != pafs.FileType.NotFound:
        stem, dot, ext = target.rpartition(".")
        target = f"{stem}-{_part_name()[:20]}{dot}{ext}"
    try:
        catalog.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        catalog.fs.move(path, target)
    except OSError as exc:
        log.warning("could not move damaged catalog file %s to quarantine: %s", path, _reason(exc))
        return None
    catalog.quarantined.append(path)
    return target


def restore_quarantined_batches(catalog: Catalog) -> int:
    """Restore, from commit markers, the rows of every attempt batch this catalog quarantined and
    has not restored yet. Returns the rows written."""
    restored = catalog.restored_jobs
    jobs = []
    for path in catalog.quarantined:
        folder = path.rsplit("/", 2)
        if len(folder) == 3 and folder[0].endswith("/attempts") and folder[1].startswith("job_id="):
            job_id = folder[1][len("job_id=") :]
            if job_id not in restored:
                restored.add(job_id)  # before reading: a reader finding another damaged file must not loop
                jobs.append(job_id)
    return sum(restore_from_markers(catalog, job_id) for job_id in jobs)


def restore_from_markers(catalog: Catalog, job_id: str) -> int:
    """Write a ``recovered`` row into ``job_id``'s partition for each of its tasks that has no valid
    succeeded row into its output but a commit marker whose clip matches. Returns the rows written;
    0 when the job's record or task list is unreadable (the next submit adopts the clips instead)."""
    from farm.render import result_from_record

    try:
        record = next(j for j in catalog.jobs() if j.job_id == job_id)
        tasks = catalog.tasks(job_id)
    except (StopIteration, CatalogError):
        return 0
    target = OutputTarget(record.output, StorageOptions.from_json(record.storage_json))
    table = catalog.attempts(columns=["task_id", "status", "output_root", "attempt_uid", "finished_at", "invalidates"])
    done = valid_successes(table.to_pylist(), target.uri)
    sink = open_sink(target)
    rows = []
    for task in tasks:
        if task.task_id in done:
            continue
        marker = sink.get_json(f"{task.task_id}.json")
        if not marker or marker.get("task_id") != task.task_id:
            continue
        result = result_from_record(marker)
        if result.succeeded and sink.matches(f"{task.task_id}.mp4", result.sha256):
            rows.append(attempt_row(task, result, target.uri, final=True, recovered=True))
    if rows:
        catalog._write_attempts(job_id, rows)
        log.warning("restored %d attempt row(s) of job %s from the commit markers in %s", len(rows), job_id, target.uri)
    return len(rows)


def readable_attempt_files(catalog: Catalog, files: list[str], folder: str) -> list[str]:
    """The attempt files of ``folder`` that read, found one by one (the damaged ones skipped or
    quarantined); after a quarantine, with the rows restored from commit markers in new files."""
    readable = [f for f in files if catalog._read(f, ATTEMPT_SCHEMA) is not None]
    if catalog.quarantined:
        restore_quarantined_batches(catalog)
        readable = catalog._live_files(folder)
    return readable


def damaged_tasks_error(catalog: Catalog, job_id: str, path: str) -> CatalogError:
    where = "moved to quarantine/" if catalog.quarantine else "skipped; 'farm catalog check' quarantines it"
    return CatalogError(
        f"job {job_id}'s task list {path} is damaged ({where})",
        hint="submit the job's manifest again: that writes a new job with a new task list "
        "(clips already rendered are kept)",
    )


def damaged_job_error(catalog: Catalog, job_ref: str) -> CatalogError | None:
    """The error for a job asked for by id whose record is damaged (skipped or quarantined)."""
    for folder in ("jobs", f"{QUARANTINE}/jobs"):
        infos = catalog.fs.get_file_info(pafs.FileSelector(catalog._path(folder), allow_not_found=True))
        hits = [i.path for i in infos if i.base_name.startswith(job_ref) and i.base_name.endswith(".parquet")]
        if hits:
            where = "is in quarantine" if folder != "jobs" else "is damaged"
            return CatalogError(
                f"job {job_ref}'s record {hits[0]} {where}",
                hint="submit the job's manifest again: that writes a new job record and task list "
                "(clips already rendered are kept); 'farm jobs' lists the jobs that remain",
            )
    return None


def check(catalog: Catalog, dry_run: bool = False) -> CheckReport:
    """Read every catalog file whole; list the damaged ones and (unless ``dry_run``) quarantine them
    and restore the rows of quarantined attempt batches from commit markers."""
    files = [f for table in _TABLES for f in catalog._files(catalog._path(table))]
    damaged: list[DamagedFile] = []
    for path in files:
        try:
            pq.read_table(path, filesystem=catalog.fs)
        except (pa.ArrowException, OSError, ValueError) as exc:
            moved = None if dry_run else quarantine_file(catalog, path)
            damaged.append(DamagedFile(path, _reason(exc), moved))
    restored = 0 if dry_run else restore_quarantined_batches(catalog)
    return CheckReport(len(files), damaged, restored)


def compact(catalog: Catalog, job_id: str | None = None) -> CompactionReport:
    """Merge each job's attempt and event files into one file per partition.

    Order of work, so that an interruption anywhere is harmless: (1) delete files that an
    earlier compacted file already replaces, (2) write the new compacted file naming every
    file it replaces, (3) delete those files.
    """
    partitions = merged = written = rows = finished = 0
    for kind in ("attempts", "events"):
        schema = ATTEMPT_SCHEMA if kind == "attempts" else EVENT_SCHEMA
        folders = sorted({f.rsplit("/", 1)[0] for f in catalog._files(catalog._path(kind))})
        if job_id:
            folders = [f for f in folders if f.endswith(f"/job_id={job_id}")]
        for folder in folders:
            partitions += 1
            files = catalog._files(folder)
            replaced = replaced_by_compaction(catalog, files)
            for path in sorted(replaced & set(files)):
                catalog._delete(path)
                finished += 1
            live = [f for f in files if f not in replaced]
            if len(live) < 2:
                continue
            tables = {f: catalog._read(f, schema) for f in live}
            live = [f for f in live if tables[f] is not None]  # a damaged file is never merged nor deleted
            if len(live) < 2:
                continue
            table = pa.concat_tables(tables[f] for f in live)
            names = sorted(os.path.basename(f) for f in live) + sorted(os.path.basename(f) for f in replaced)
            table = table.replace_schema_metadata({_REPLACES: json.dumps(names).encode()})
            catalog._write(table, f"{folder}/{_part_name('compact-')}")
            for path in live:
                catalog._delete(path)
            merged += len(live)
            written += 1
            rows += table.num_rows
    return CompactionReport(partitions, merged, written, rows, finished)
