"""The Parquet catalog without Ray: batches, status, filters, compaction (interrupted too), old schemas."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.catalog import ATTEMPT_SCHEMA, Catalog, JobRecord, ResultFilter
from farm.records import attempt_row
from farm.task import AttemptStatus, ModelRef, RenderSettings, Result, Task

MODEL = ModelRef("tiny", "builtin", "/m", "builtin:test", "WanPipeline")
OUT = "/out"


def task(i: int, product: str) -> Task:
    return Task(
        f"task{i:03d}", f"{product} {i}", i, MODEL, RenderSettings(64, 64, 9, 8, 4, 5.0), (("product", product),)
    )


def result(t: Task, ok: bool, attempt: int = 1, finished: float | None = None) -> Result:
    status = AttemptStatus.SUCCEEDED if ok else AttemptStatus.FAILED
    return Result(
        t.task_id,
        attempt,
        status,
        output_uri=f"{OUT}/{t.task_id}.mp4" if ok else "",
        error="" if ok else "boom",
        started_at=time.time(),
        finished_at=finished or time.time(),
    )


def make_job(catalog: Catalog, tasks: list[Task], job_id: str = "job-1") -> JobRecord:
    job = JobRecord(
        job_id,
        "c",
        datetime.now(UTC),
        "me",
        "host",
        "/m.yaml",
        "sha",
        "yaml",
        "tiny",
        OUT,
        2,
        tuple(t.task_id for t in tasks),
        "0",
    )
    catalog.record_job(job)
    return job


@pytest.fixture
def filled(tmp_path):
    """A job of 20 tasks whose attempts were written in batches of 3 (7 small files)."""
    catalog = Catalog(tmp_path / "catalog")
    tasks = [task(i, "shoe" if i % 2 else "bag") for i in range(20)]
    job = make_job(catalog, tasks)
    with catalog.writer(job.job_id, batch_rows=3, batch_seconds=3600) as writer:
        for t in tasks:
            ok = t.seed % 5 != 0
            writer.add(attempt_row(t, result(t, ok), OUT, final=True))
    return catalog, job, tasks


def test_batched_writes_status_and_done_set(filled):
    catalog, job, tasks = filled
    assert len(catalog._files(catalog._path("attempts"))) == 7
    status = catalog.status(job)
    assert status.counts == {"succeeded": 16, "failed": 4, "pending": 0} and status.state == "submitted"
    done = catalog.done_rows([t.task_id for t in tasks], OUT)  # as recorded: OUT holds no files to verify
    assert len(done) == 16 and catalog.done_rows([t.task_id for t in tasks], "/elsewhere") == {}
    assert catalog.done([t.task_id for t in tasks], OUT) == {}  # verified: no clip there, nothing done


def test_results_filter_by_status_variant_and_time(filled):
    catalog, job, _ = filled
    assert len(catalog.results(job)) == 20
    assert len(catalog.results(job, ResultFilter(status="failed"))) == 4
    shoes = catalog.results(job, ResultFilter(variant=(("product", "shoe"),)))
    assert len(shoes) == 10 and {dict(r["variant"])["product"] for r in shoes} == {"shoe"}
    assert catalog.results(job, ResultFilter(since=datetime.now(UTC) + timedelta(hours=1))) == []
    assert len(catalog.results(job, ResultFilter(until=datetime.now(UTC) + timedelta(hours=1)))) == 20


def rows_of(catalog: Catalog) -> list[tuple]:
    return sorted((r["task_id"], r["attempt_uid"]) for r in catalog.attempts().to_pylist())


def test_compaction_merges_files_and_keeps_every_row(filled):
    catalog, job, _ = filled
    before = rows_of(catalog)
    report = catalog.compact()
    assert (report.merged_files, report.written_files, report.rows) == (7, 1, 20)
    assert len(catalog._files(catalog._path("attempts"))) == 1
    assert rows_of(catalog) == before
    # New batches after a compaction are compacted with the compacted file next time.
    t = task(99, "hat")
    with catalog.writer(job.job_id) as writer:
        writer.add(attempt_row(t, result(t, True), OUT, final=True))
    catalog.compact()
    assert len(catalog._files(catalog._path("attempts"))) == 1 and len(rows_of(catalog)) == 21


def test_interrupted_compaction_loses_no_row_shows_none_twice_and_rerun_finishes(filled, monkeypatch):
    catalog, _, _ = filled
    before = rows_of(catalog)
    real_delete = catalog._delete
    deleted = []

    def crash_after_two(path: str) -> None:
        if len(deleted) == 2:
            raise KeyboardInterrupt("killed mid-compaction")
        deleted.append(path)
        real_delete(path)

    monkeypatch.setattr(catalog, "_delete", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        catalog.compact()
    monkeypatch.undo()
    # The compacted file and five of the seven originals are on disk together: readers see each row once.
    assert len(catalog._files(catalog._path("attempts"))) == 6
    assert rows_of(catalog) == before
    report = catalog.compact()
    assert report.finished_deletes == 5
    assert len(catalog._files(catalog._path("attempts"))) == 1 and rows_of(catalog) == before


def test_catalog_files_of_schema_v1_still_read(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    t = task(1, "shoe")
    job = make_job(catalog, [t])
    v1_fields = [f for f in ATTEMPT_SCHEMA if f.name not in ("attempt_uid", "storage")]
    row = {
        k: v for k, v in attempt_row(t, result(t, True), OUT, final=True).items() if k not in ("attempt_uid", "storage")
    }
    row["schema_version"] = 1
    folder = tmp_path / "catalog" / "attempts" / "job_id=job-1"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=pa.schema(v1_fields)), folder / "old.parquet")
    (read,) = catalog.results(job)
    assert read["status"] == "succeeded" and read["schema_version"] == 1
    assert read["attempt_uid"] is None and read["storage"] is None
    assert catalog.status(job).counts["succeeded"] == 1


def test_catalog_written_by_schema_v3_reads_whole(tmp_path):
    """tests/fixtures/catalog-v3 was written by farm's previous release (schema v3, no error_kind)."""
    import shutil
    from pathlib import Path

    from farm.task import Mode, ModelKind

    shutil.copytree(Path(__file__).parent / "fixtures" / "catalog-v3", tmp_path / "catalog")
    catalog = Catalog(tmp_path / "catalog")
    (job,) = catalog.jobs()
    assert (job.campaign, job.priority, job.timeout_s, job.task_count) == ("v3job", 5, 120.0, 2)
    assert job.deadline_at is not None
    tasks = catalog.tasks(job.job_id)
    assert [t.prompt for t in tasks] == ["a red shoe", "a blue shoe"]
    assert tasks[0].model.kind is ModelKind.BUILTIN and tasks[0].mode is Mode.T2V
    assert tasks[0].settings.negative_prompt == "blurry" and tasks[0].needs.min_vram_gb == 1.5
    # Task ids still derive the same way from what the task list holds: nothing re-renders.
    from farm.task import compute_task_id

    assert all(compute_task_id(t.model.identity, t.mode, t.prompt, t.settings, t.seed) == t.task_id for t in tasks)
    status = catalog.status(job)
    assert status.counts == {"succeeded": 1, "failed": 1, "pending": 0} and status.state == "finished"
    rows = catalog.results(job)
    assert [r["status"] for r in rows] == ["succeeded", "failed"]
    assert all(r["error_kind"] is None and r["schema_version"] == 3 for r in rows)
    assert catalog.results(job, ResultFilter(error_kind="render")) == []
    done = catalog.done_rows([t.task_id for t in tasks], "/out/v3job")
    assert {task_id: row["output_uri"] for task_id, row in done.items()} == {tasks[0].task_id: "/out/v3job/a.mp4"}
