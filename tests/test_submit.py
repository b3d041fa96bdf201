"""Integration: jobs on a real local Ray with the real tiny model; every mp4 decoded back; the
catalog read back with pyarrow and duckdb; resume renders nothing twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest

from farm import api
from farm.faults import Fault
from farm.storage import sha256_file
from farm.video import probe

pytestmark = pytest.mark.ray

SMALL = """
campaign: small
prompt: "{product} for {audience}"
render: {width: 48, height: 32, frames: 5, fps: 10, steps: 2}
axes:
  product: [shoe, bag, hat]
  audience:
    - kids
    - value: pros
      render: {frames: 9}
seeds: [1]
retries: 2
"""


def attempts_table(farm_home: Path):
    return ds.dataset(farm_home / "catalog" / "attempts", format="parquet", partitioning="hive").to_table()


def test_job_renders_every_clip_once_per_task_with_one_model_load_per_renderer(
    ray_local, farm_home, write_manifest, monkeypatch
):
    manifest = write_manifest(SMALL)
    outcome = api.submit(manifest, workers=2)
    assert outcome.run is not None
    assert (outcome.run.succeeded, outcome.run.failed, outcome.run.attempts) == (6, 0, 6)

    # At most two renderers (two slots); each that came up has its own process and loaded the model
    # exactly once, however many clips it rendered.
    ready = [r for r in outcome.renderers if r["ready"]]
    assert 1 <= len(ready) <= len(outcome.renderers) <= 2
    assert len({r["pid"] for r in ready}) == len(ready) and all(r["loads"] == 1 for r in ready)

    rows = attempts_table(farm_home).to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"succeeded"}
    assert {r["job_id"] for r in rows} == {outcome.job_id}
    assert {r["actor_id"] for r in rows} <= {r["actor_id"] for r in outcome.renderers}
    for row in rows:
        video = Path(row["output_uri"])
        assert video.parent == Path(outcome.output)
        assert video.name == f"{row['task_id']}.mp4"
        assert sha256_file(video) == row["sha256"] and video.stat().st_size == row["bytes"]
        info = probe(video)
        assert (info.frames, info.width, info.height, info.fps) == (row["frames"], 48, 32, 10.0)
        assert Path(row["poster_uri"]).exists()
        assert row["generate_s"] > 0 and row["node_id"] and row["seed"] == 1
        assert dict(row["variant"])["product"] in {"shoe", "bag", "hat"}
    assert sorted(r["frames"] for r in rows) == [5, 5, 5, 9, 9, 9]

    # Re-submitting the finished job renders nothing and needs no Ray: it answers from the catalog.
    from farm import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished job must not start or join Ray")

    with monkeypatch.context() as patched:
        patched.setattr(cluster, "connect", no_ray)
        again = api.submit(manifest, workers=2)
    assert len(again.plan.done) == 6 and not again.plan.to_render and again.run is None
    assert len(attempts_table(farm_home)) == 6
    status = api.status(again.job_id)
    assert status.counts == {"succeeded": 6, "failed": 0, "pending": 0} and status.rendered == 0

    # The catalog is plain Parquet: duckdb reads it as it lies.
    glob = str(farm_home / "catalog" / "attempts" / "*" / "*.parquet")
    count, total_bytes = (
        duckdb.connect()
        .execute(
            f"select count(*), sum(bytes) from read_parquet('{glob}', hive_partitioning=true) "
            f"where status = 'succeeded' and job_id = '{outcome.job_id}'"
        )
        .fetchone()
    )
    assert count == 6 and total_bytes == sum(r["bytes"] for r in rows)


def test_failures_are_retried_then_recorded_and_the_job_goes_on(ray_local, farm_home, write_manifest, faults):
    manifest = write_manifest(SMALL)
    # "shoe" tasks fail on their first attempt only; "hat" tasks fail on every attempt.
    faults(Fault("shoe", fail_attempts=1))
    flaky = api.submit(manifest, workers=2)
    assert (flaky.run.succeeded, flaky.run.failed, flaky.run.attempts) == (6, 0, 8)
    rows = attempts_table(farm_home).to_pylist()
    shoe = sorted((r["attempt"], r["status"], r["final"]) for r in rows if "shoe" in r["prompt"])
    assert shoe == [(1, "failed", False), (1, "failed", False), (2, "succeeded", True), (2, "succeeded", True)]
    assert all("injected test fault" in r["error"] for r in rows if r["status"] == "failed")


def test_a_task_failing_every_attempt_ends_failed_with_its_error(ray_local, farm_home, write_manifest, faults):
    manifest = write_manifest(SMALL.replace("retries: 2", "retries: 1"))
    faults(Fault("hat"))
    outcome = api.submit(manifest, workers=2)
    assert (outcome.run.succeeded, outcome.run.failed, outcome.run.attempts) == (4, 2, 8)
    status = api.status(outcome.job_id)
    assert status.counts == {"succeeded": 4, "failed": 2, "pending": 0}
    _, results = api.results(outcome.job_id)
    failed = [r for r in results if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["attempt"] == 2 and r["final"] for r in failed)
    assert all("injected test fault (attempt 2)" in r["error"] for r in failed)

    # Resubmitting retries only the failed tasks.
    faults()
    again = api.submit(manifest, workers=1)
    assert (len(again.plan.done), again.run.succeeded) == (4, 2)
    per_task = Counter(r["task_id"] for r in attempts_table(farm_home).to_pylist() if r["status"] == "succeeded")
    assert set(per_task.values()) == {1} and len(per_task) == 6
