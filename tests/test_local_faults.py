"""One machine's faults (issue 13): two embedded submits on one catalog, a submit joining a farm
whose owner is killed, a torn catalog file, outputs deleted or changed after they succeeded,
unwritable places, a full disk, unexpected errors. Real parts: local Ray, the tiny model,
SeaweedFS, real processes killed with SIGKILL, a real size-limited tmpfs where the machine allows
one (else ENOSPC injected at the sink and the catalog writer)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from farm import api
from farm.catalog import ATTEMPT_SCHEMA, Catalog
from farm.embedded import LOCK_FILE, STATE_FILE, Membership, Role
from farm.errors import CatalogError, ClusterError
from farm.faults import Fault
from farm.locks import FileLock, filesystem_type, mounted_type, parse_mountinfo
from farm.storage import LocalSink
from farm.task import AttemptStatus
from farm.verify import Problem

FARM = [sys.executable, "-m", "farm.cli"]

JOB = """
campaign: {name}
prompt: "clip {{n}} of {name}"
render: {{width: 32, height: 32, frames: 5, steps: 2}}
axes:
  n: [1, 2, 3, 4]
retries: 0
"""


def manifest_text(name: str) -> str:
    return JOB.format(name=name)


def succeeded_per_task(catalog_root: Path) -> Counter:
    rows = Catalog(catalog_root).attempts().to_pylist()
    return Counter(r["task_id"] for r in rows if r["status"] == AttemptStatus.SUCCEEDED)


def slow(seconds: float) -> str:
    return json.dumps({"prompt_contains": "clip", "action": "slow", "hang_s": seconds})


def start_submit(manifest: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*FARM, "submit", str(manifest), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def farm_state(catalog_root: Path) -> dict:
    try:
        return json.loads((catalog_root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- one farm per catalog


@pytest.mark.ray
def test_two_submits_on_one_catalog_share_one_farm_and_render_each_task_once(farm_home, write_manifest):
    manifest = write_manifest(manifest_text("twice"))
    env = {"FARM_TEST_FAULTS": slow(0.3)}
    submits = [start_submit(manifest, "--workers", "2", "--format", "json", env=env) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in submits]
    assert [p.returncode for p in submits] == [0, 0], [err for _, err in results]
    summaries = [json.loads(out) for out, _ in results]
    # One owned the farm and rendered the four clips; the other joined it, its job waited for them.
    assert sorted(s["rendered"] for s in summaries) == [0, 4]
    assert all(s["already_done"] + s["rendered"] == 4 and s["failed"] == 0 for s in summaries)
    catalog = farm_home / "catalog"
    per_task = succeeded_per_task(catalog)
    assert len(per_task) == 4 and set(per_task.values()) == {1}
    # Both jobs were admitted by one controller (one Ray session), which then stopped.
    sessions = {
        e["detail"] for s in summaries for e in Catalog(catalog).events(s["job_id"]) if e["event"] == "admitted"
    }
    assert len(sessions) == 1
    assert farm_state(catalog)["state"] == "stopped" and not list((catalog / ".embedded.jobs").iterdir())


@pytest.mark.ray
def test_a_submit_that_joined_takes_over_when_the_owner_is_killed_and_both_jobs_finish(farm_home, write_manifest):
    first, second = write_manifest(manifest_text("owner"), "a.yaml"), write_manifest(manifest_text("joiner"), "b.yaml")
    catalog = farm_home / "catalog"
    # The owner's farm hangs on the owner's clips, so its job is surely running when it is killed; the
    # farm the joiner starts has the joiner's environment (no fault) and renders everything at once.
    hang = json.dumps({"prompt_contains": "of owner", "action": "slow", "hang_s": 120})
    owner = start_submit(first, "--workers", "2", env={"FARM_TEST_FAULTS": hang}, start_new_session=True)
    try:
        wait_for(lambda: farm_state(catalog).get("state") == "running", 180, "the first submit's farm")
        joiner = start_submit(second, "--workers", "2", env={"FARM_TEST_FAULTS": "[]"})
        wait_for(lambda: list((catalog / ".embedded.jobs").glob("*.progress.json")), 60, "the second job's admission")
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the owner and the Ray it started die at once
        owner.communicate(timeout=60)
    _, err = joiner.communicate(timeout=240)
    assert joiner.returncode == 0, err
    assert "joined the embedded farm of pid" in err and "this submit takes it over" in err
    assert "resumed 1 job(s) of the stopped farm" in err
    per_task = succeeded_per_task(catalog)
    assert len(per_task) == 8 and set(per_task.values()) == {1}, "a task was rendered twice"
    states = {j.campaign: s.state for j, s in ((j, api.status(j.job_id)) for j in Catalog(catalog).jobs())}
    assert states == {"owner": "finished", "joiner": "finished"}
    assert farm_state(catalog)["state"] == "stopped" and farm_state(catalog)["pid"] == joiner.pid


def test_a_lock_left_by_kill_9_is_free_and_the_dead_farm_is_what_the_next_owner_finds(tmp_path):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / STATE_FILE).write_text(
        json.dumps({"pid": 999999, "user": "x", "uid": os.getuid(), "host": "h", "state": "running", "session": "s1"})
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from farm.locks import FileLock; FileLock({str(catalog / LOCK_FILE)!r}).acquire(); "
         "print('held', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    assert not FileLock(catalog / LOCK_FILE).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    membership = Membership(catalog)
    try:
        assert membership.claim(wait_s=5) is Role.OWNER  # at once: the kernel dropped the dead holder's lock
        assert membership.previous is not None and membership.previous.session == "s1"
        assert farm_state(catalog)["pid"] == os.getpid() and farm_state(catalog)["state"] == "starting"
    finally:
        membership.close()


def test_another_users_farm_and_a_network_filesystem_are_refused_with_one_line(tmp_path, monkeypatch):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / STATE_FILE).write_text(
        json.dumps({"pid": os.getppid(), "user": "alice", "uid": os.getuid() + 1, "host": "h", "state": "running"})
    )
    holder = FileLock(catalog / LOCK_FILE)
    assert holder.acquire()  # a second open file: to flock, another process
    try:
        with pytest.raises(ClusterError) as info:
            Membership(catalog).claim(wait_s=5)
        message = str(info.value)
        assert f"in use by the embedded farm of pid {os.getppid()} of user alice" in message
        assert "--address" in message and "\n" not in message
    finally:
        holder.release()
    monkeypatch.setattr("farm.embedded.filesystem_type", lambda path: "nfs4")
    with pytest.raises(ClusterError, match=r"network filesystem \(nfs4\).*--address"):
        Membership(catalog).claim(wait_s=5)


def test_the_filesystem_of_a_path_is_read_from_mountinfo(tmp_path):
    mountinfo = (
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "40 22 0:35 / /mnt/team\\040share rw - nfs4 server:/export rw\n"
        "41 40 0:36 / /mnt/team\\040share/local rw - tmpfs tmpfs rw\n"
    )
    assert parse_mountinfo(mountinfo)[1] == ("/mnt/team share", "nfs4")
    assert mounted_type("/mnt/team share/catalog/x", mountinfo) == "nfs4"
    assert mounted_type("/mnt/team share/local/catalog", mountinfo) == "tmpfs"
    assert mounted_type("/mnt/team sharer", mountinfo) == "ext4"
    assert mounted_type("/home/me/farm-data/catalog", mountinfo) == "ext4"
    assert filesystem_type(tmp_path) != ""  # the real /proc/self/mountinfo


def test_two_first_runs_build_the_tiny_model_once(tmp_path, monkeypatch):
    from farm.models import tiny

    builds = []

    def build(directory: Path) -> None:
        builds.append(directory)
        time.sleep(0.3)
        (directory / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "_build", build)
    threads = [threading.Thread(target=tiny.ensure_tiny_model, args=(tmp_path / "models",)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and (tiny.tiny_dir(tmp_path / "models") / "model_index.json").exists()


# ----------------------------------------------------------------------------- a damaged catalog


def truncate(path: Path, size: int = 100) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


@pytest.mark.ray
def test_a_truncated_batch_is_quarantined_and_its_rows_come_back_from_commit_markers(
    ray_local, farm_home, write_manifest, caplog
):
    manifest = write_manifest(manifest_text("torn"))
    first = api.submit(manifest, workers=2)
    assert first.run.succeeded == 4
    catalog = farm_home / "catalog"
    batches = sorted((catalog / "attempts" / f"job_id={first.job_id}").glob("*.parquet"))
    clips = {p.name: p.stat().st_mtime_ns for p in Path(first.output).glob("*.mp4")}
    for batch in batches:
        truncate(batch)

    # A reader skips the file, with one warning naming it; nothing moves.
    status = api.status(first.job_id)
    assert status.counts["succeeded"] == 0 and batch.exists()
    assert any(str(batch) in r.getMessage() and "skipped damaged" in r.getMessage() for r in caplog.records)

    again = api.submit(manifest, workers=2)  # a write path: quarantined, rows restored, nothing rendered
    assert again.run is None and len(again.plan.done) == 4
    assert all((catalog / "quarantine" / b.relative_to(catalog)).exists() and not b.exists() for b in batches)
    restored = Catalog(catalog).attempts(first.job_id).to_pylist()
    assert len(restored) == 4 and all(r["recovered"] and r["status"] == "succeeded" for r in restored)
    assert api.status(first.job_id).counts["succeeded"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in Path(first.output).glob("*.mp4")} == clips


def test_damaged_job_records_and_task_lists_say_how_to_rebuild_them(tmp_path):
    from tests.test_catalog import make_job, task

    catalog = Catalog(tmp_path / "catalog")
    tasks = [task(i, "shoe") for i in range(3)]
    make_job(catalog, tasks, "job-a")
    catalog.record_tasks("job-a", tasks)
    truncate(tmp_path / "catalog" / "tasks" / "job_id=job-a" / "tasks.parquet")
    with pytest.raises(CatalogError, match=r"job job-a's task list .* is damaged .*submit the job's manifest again"):
        catalog.tasks("job-a")
    truncate(tmp_path / "catalog" / "jobs" / "job-a.parquet")
    assert catalog.jobs() == []  # skipped, not a crash
    with pytest.raises(CatalogError, match=r"job job-a's record .* is damaged — submit the job's manifest again"):
        catalog.job("job-a")

    report = api.check_catalog(catalog_root=tmp_path / "catalog")
    assert report.files == 3 and len(report.damaged) == 2
    assert all(d.quarantined_to and "/quarantine/" in d.quarantined_to for d in report.damaged)
    with pytest.raises(CatalogError, match=r"job-a's record .* is in quarantine — submit the job's manifest again"):
        Catalog(tmp_path / "catalog").job("job-a")
    assert api.check_catalog(catalog_root=tmp_path / "catalog").damaged == []


# ----------------------------------------------------------------------------- "done" is verified


@pytest.mark.ray
def test_deleted_and_changed_outputs_are_reported_then_rendered_again_as_new_attempts(
    ray_local, farm_home, write_manifest
):
    manifest = write_manifest(manifest_text("verified"))
    first = api.submit(manifest, workers=2)
    assert first.run.succeeded == 4 and api.verify(first.job_id).problems == []
    clips = sorted(Path(first.output).glob("*.mp4"))
    clips[0].unlink()
    clips[1].write_bytes(b"garbage")
    poster = clips[2].with_suffix(".jpg")
    poster.write_bytes(bytes(poster.stat().st_size))  # same size, other bytes: only --sha256 sees it

    report = api.verify(first.job_id)
    found = {(p.path, p.problem) for p in report.problems}
    assert found == {(str(clips[0]), Problem.MISSING), (str(clips[1]), Problem.WRONG_SIZE)}
    assert report.checked == 4 and report.files == 12
    checksums = {(p.path, p.problem) for p in api.verify(first.job_id, sha256=True).problems}
    assert checksums == found | {(str(poster), Problem.WRONG_CHECKSUM)}

    # Re-submitting renders the missing and the changed clip again, as new attempts saying why.
    again = api.submit(manifest, workers=2)
    assert len(again.plan.done) == 2 and again.run.succeeded == 2
    rows = Catalog(farm_home / "catalog").attempts(again.job_id).to_pylist()
    why = sorted(r["error_kind"] for r in rows if r["status"] == AttemptStatus.INVALIDATED)
    assert why == ["output_changed", "output_missing"]
    assert api.verify(first.job_id).problems == []

    # --repair: the poster only a checksum shows is rendered again too; then nothing is left.
    repair_job, summary = api.repair(api.verify(first.job_id, sha256=True))
    assert repair_job and summary.succeeded == 1
    assert api.verify(first.job_id, sha256=True).problems == []
    assert len(succeeded_per_task(farm_home / "catalog")) == 4


@pytest.mark.ray
def test_verify_on_s3_and_its_command_line(ray_local, farm_home, write_manifest, s3):
    manifest = write_manifest(manifest_text("s3verify") + f"output: s3://{s3.bucket}/v\n")
    first = api.submit(manifest, workers=2)
    assert first.run.succeeded == 4
    _, rows = api.results(first.job_id)
    s3.client().delete_object(Bucket=s3.bucket, Key=f"v/{rows[0]['task_id']}.mp4")
    result = subprocess.run(
        [*FARM, "verify", first.job_id, "--format", "json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems == [
        {
            "task_id": rows[0]["task_id"],
            "path": rows[0]["output_uri"],
            "problem": "missing",
            "detail": f"the catalog recorded {rows[0]['bytes']} bytes",
        }
    ]
    again = api.submit(manifest, workers=2)  # resume checks S3 too: the deleted clip is rendered again
    assert again.run.succeeded == 1 and api.verify(first.job_id).problems == []


# ----------------------------------------------------------------------------- environment, disk, bugs


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, ["--output", "/proc/farm-out"], "error: output: /proc/farm-out: cannot create this folder"),
        ({"FARM_HOME": "/proc/farm-home"}, [], "error: environment: FARM_HOME=/proc/farm-home: cannot create"),
    ],
)
def test_unwritable_output_or_farm_home_is_one_line_exit_2_before_anything_renders(
    farm_home, write_manifest, env, args, expected
):
    manifest = write_manifest(manifest_text("nowhere"))
    result = subprocess.run(
        [*FARM, "submit", str(manifest), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (farm_home / "outputs").exists() and not (farm_home / "catalog" / "attempts").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a few pages (tmpfs, size-limited), or None where it cannot be mounted
    (not root, no mount): the tests then inject ENOSPC instead."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        yield None
        return
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> None:
    """Fill the small disk to the last byte."""
    with (where / "filler").open("wb", buffering=0) as fh, pytest.raises(OSError) as full:
        while True:
            fh.write(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC


def test_a_full_disk_fails_the_write_whole_leaving_no_temp_or_torn_file(small_disk, tmp_path, monkeypatch):
    table = pa.Table.from_pylist([], schema=ATTEMPT_SCHEMA)
    local = tmp_path / "clip.mp4"
    local.write_bytes(b"v" * 3000)
    if small_disk is None:  # no tmpfs here: the same errors, injected where the bytes are written
        where = tmp_path / "injected"

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("farm.storage.shutil.copyfile", no_space)
        monkeypatch.setattr("farm.catalog.pq.write_table", no_space)
    else:
        where = small_disk
        fill(where)
    sink = LocalSink(where / "out")
    with pytest.raises(OSError) as full:
        sink.put_file(local, "a.mp4")
    assert full.value.errno == errno.ENOSPC
    catalog = Catalog(where / "catalog")
    with pytest.raises(CatalogError, match=r"cannot write the catalog file .*: No space left on device — free space"):
        catalog._write(table, catalog._path("attempts", "job_id=j", "batch.parquet"))
    leftovers = [p for p in where.rglob("*") if p.is_file() and p.name != "filler"]
    assert leftovers == [], "a temporary or torn file was left behind"


@pytest.mark.ray
def test_a_disk_filling_up_fails_attempts_as_storage_and_the_job_goes_on(
    ray_local, farm_home, write_manifest, small_disk
):
    if small_disk is None:
        pytest.skip("no size-limited tmpfs here (needs root); ENOSPC is injected by the test above")
    manifest = write_manifest(manifest_text("full"))
    first = api.submit(manifest, workers=1, output=str(small_disk))  # room for about two clips' files
    assert first.run.state == "finished" and first.run.failed >= 1
    _, rows = api.results(first.job_id)
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["error_kind"] == "storage" and "No space left" in r["error"] for r in failed)
    assert not [p for p in small_disk.iterdir() if ".tmp-" in p.name]
    assert {p.stem for p in small_disk.glob("*.mp4")} == {r["task_id"] for r in rows if r["status"] == "succeeded"}

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)  # space freed
    again = api.submit(manifest, workers=1, output=str(small_disk))
    assert again.run.failed == 0 and again.run.succeeded == len(failed)
    assert set(succeeded_per_task(farm_home / "catalog").values()) == {1}


def test_an_unexpected_error_is_one_line_exit_70_with_the_traceback_in_a_log(farm_home, monkeypatch, capsys):
    from farm import cli

    def broken(*args, **kwargs):
        raise RuntimeError("the catalog index is inside out\nsecond line")

    monkeypatch.setattr(api, "jobs", broken)
    farm_logger = logging.getLogger("farm")
    monkeypatch.setattr(farm_logger, "handlers", [])  # main() adds its warning handler: gone after the test
    monkeypatch.setattr(farm_logger, "level", farm_logger.level)
    monkeypatch.setattr(sys, "argv", ["farm", "jobs"])
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() points sys.stdout at stderr; put it back after
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 70
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: internal error in 'farm jobs': RuntimeError: the catalog index is inside out")
    log = Path(lines[0].split("the full traceback is in ")[1].split(";")[0])
    assert log.parent == farm_home / "logs" and "Traceback (most recent call last)" in log.read_text()
    assert "second line" in log.read_text()


def test_the_newest_valid_success_counts_and_an_invalidated_one_never_does():
    """The done rule as rows: the newest valid success counts; an invalidated one never does."""
    from farm.verify import success_key, valid_successes

    base = {"task_id": "t", "output_root": "/o", "invalidates": None}
    old = {**base, "status": "succeeded", "attempt_uid": "a", "finished_at": 1}
    new = {**base, "status": "succeeded", "attempt_uid": "b", "finished_at": 2}
    assert valid_successes([old, new], "/o")["t"] is new
    invalidate_new = {**base, "status": "invalidated", "attempt_uid": "c", "finished_at": 3, "invalidates": "b"}
    assert valid_successes([old, new, invalidate_new], "/o")["t"] is old
    invalidate_old = {**invalidate_new, "invalidates": success_key(old)}
    assert valid_successes([old, new, invalidate_new, invalidate_old], "/o") == {}
    assert valid_successes([old], "/elsewhere") == {}


@pytest.mark.ray
def test_a_renderer_dying_mid_batch_has_its_finished_clips_adopted_not_rendered_again(
    ray_local, farm_home, write_manifest, faults, tmp_path
):
    # 50 ms clips go to renderers in batches once measured (farm/scheduler.py): 4 single calls,
    # then batches of 5 (an even share of the 20 left over 2 renderers × 2 calls): clips 5-9 and
    # 10-14. Clip 14 kills its renderer: 10-13 are committed but never reported back.
    trace, once = tmp_path / "renders.log", tmp_path / "killed-once"
    faults(
        Fault("clip", action="slow", hang_s=0.0, trace=str(trace)),
        Fault("clip 14 of", action="exit", once=str(once)),
    )
    text = manifest_text("batch").replace("render:", "model: 'fake:sleep-50ms'\nrender:")
    manifest = write_manifest(text.replace("n: [1, 2, 3, 4]", f"n: {list(range(1, 25))}"))
    outcome = api.submit(manifest, workers=2)
    assert (outcome.run.succeeded, outcome.run.failed) == (24, 0)
    renders = Counter(line.split("\t")[0] for line in trace.read_text().splitlines())
    # Every clip rendered once; the one that killed its renderer twice (killed, then alone).
    assert len(renders) == 24 and renders.pop("clip 14 of batch") == 2 and set(renders.values()) == {1}
    catalog = Catalog(farm_home / "catalog")
    rows = catalog.attempts(outcome.job_id).to_pylist()
    ok = {r["prompt"]: r for r in rows if r["status"] == "succeeded"}
    assert len(ok) == len(catalog.job(outcome.job_id).task_ids) == 24
    # Whatever the dead renderer rendered (reported, or committed and never reported: adopted from
    # its commit markers) is catalogued as its own attempt; the clip it died on was rendered again
    # by the other renderer.
    traced = [line.split("\t") for line in trace.read_text().splitlines()]
    dead = next(pid for prompt, _, pid in traced if prompt == "clip 14 of batch")
    by_dead = [prompt for prompt, _, pid in traced if pid == dead and prompt != "clip 14 of batch"]
    assert by_dead and len({ok[p]["actor_id"] for p in by_dead}) == 1
    assert ok["clip 14 of batch"]["actor_id"] != ok[by_dead[0]]["actor_id"]
    interrupted = [r["prompt"] for r in rows if r["status"] == "interrupted"]
    assert "clip 14 of batch" in interrupted and not set(interrupted) & set(by_dead), interrupted
