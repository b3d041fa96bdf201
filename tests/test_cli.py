"""End to end through the `farm` command, as a user runs it: exit codes, one-line errors,
JSON for scripts, and a job killed mid-way then resumed without rendering anything twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

FARM = [sys.executable, "-m", "farm.cli"]

JOB = """
campaign: cli
prompt: "clip {n} of {kind}"
render: {width: 32, height: 32, frames: 5, steps: 2}
axes:
  n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  kind: [a, b]
"""


def farm(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FARM, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_validate_and_plan_on_the_shipped_manifests(farm_home):
    demo = farm("validate", "manifests/demo.yaml")
    assert demo.returncode == 0 and "24 tasks" in demo.stdout
    plan = farm("plan", "manifests/spring-campaign.yaml", "--format", "json")
    assert plan.returncode == 0, plan.stderr
    data = json.loads(plan.stdout)
    assert data["tasks"] >= 100 and data["to_render"] == data["tasks"] and data["already_done"] == 0
    assert len(data["to_render_tasks"]) == data["tasks"]


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ("campaign: x\nprompt: '{who}'\n", ":2: prompt: placeholder {who} has no axis"),
        ("campaign: x\nprompt: hi\nrender:\n  height: 70\n", ":4: render.height: 70 is not a multiple of 16"),
        ("campaign: x\nprompt: hi\nseeds: {count: -1}\n", ":3: seeds.count: -1: input should be greater than 0"),
        ("campaign: x\nprompt: hi\ncolor: red\n", ":3: color: unknown key 'color'"),
        ("campaign: x\nprompt: [unclosed\n", "YAML syntax error"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "plan", "submit"])
def test_bad_manifest_is_one_line_exit_2_and_renders_nothing(farm_home, tmp_path, manifest, expected, command):
    path = tmp_path / "bad.yaml"
    path.write_text(manifest)
    result = farm(command, str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (farm_home / "catalog").exists() and not (farm_home / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["submit", "does-not-exist.yaml"], "error: manifest does-not-exist.yaml does not exist — check the path"),
        (["status", "no-such-job"], "error: no job 'no-such-job' in the catalog"),
        (["submit", "manifests/demo.yaml", "--workers", "0"], "error: Invalid value for '--workers'"),
        (["submit", "manifests/demo.yaml", "--address", "127.0.0.1:1"], "error: --address: cannot reach a Ray head"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(farm_home, args, expected):
    result = farm(*args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FARM_CATALOG_BATCH_ROWS", "lots", "FARM_CATALOG_BATCH_ROWS='lots' is not a whole number ≥ 1"),
        ("FARM_SCALE_DOWN_IDLE_S", "-3", "FARM_SCALE_DOWN_IDLE_S='-3' is not a number ≥ 0"),
        ("FARM_AUTOSCALE_INTERVAL_S", "nan", "FARM_AUTOSCALE_INTERVAL_S='nan' is not a number ≥ 0.01"),
    ],
)
def test_invalid_farm_variables_are_one_line_exit_2_before_anything_runs(farm_home, variable, value, expected):
    result = farm("submit", "manifests/demo.yaml", env={variable: value})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: environment: {expected} — fix or unset the variable"
    assert not farm_home.exists()


def test_submit_json_then_jobs_status_results_and_exit_1_on_failures(farm_home, write_manifest):
    manifest = write_manifest(JOB.replace("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]", "[1, 2]"))
    faults = json.dumps({"prompt_contains": "clip 2 of b"})
    result = farm("submit", str(manifest), "--workers", "2", "--format", "json", env={"FARM_TEST_FAULTS": faults})
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["tasks"], summary["rendered"], summary["failed"]) == (4, 3, 1)
    job_id = summary["job_id"]

    jobs = json.loads(farm("jobs", "--format", "json").stdout)
    assert [j["job_id"] for j in jobs] == [job_id]
    status = json.loads(farm("status", job_id[:12], "--format", "json").stdout)
    assert (status["succeeded"], status["failed"], status["pending"], status["state"]) == (3, 1, 0, "finished")
    rows = json.loads(farm("results", "cli", "--format", "json").stdout)
    assert sorted(r["status"] for r in rows) == ["failed", "succeeded", "succeeded", "succeeded"]
    failed = farm("results", job_id, "--format", "csv", "--status", "failed").stdout.splitlines()
    assert failed[0].startswith("task_id,status,attempt") and len(failed) == 2 and "injected test fault" in failed[1]

    only_a = json.loads(farm("results", job_id, "--where", "kind=a", "--format", "json").stdout)
    assert len(only_a) == 2 and {r["variant"]["kind"] for r in only_a} == {"a"}
    assert len(json.loads(farm("results", job_id, "--since", "1h", "-f", "json").stdout)) == 4
    assert json.loads(farm("results", job_id, "--until", "2000-01-01", "-f", "json").stdout) == []
    exported = farm_home / "export.parquet"
    assert farm("results", job_id, "--format", "parquet", "--out", str(exported)).returncode == 0
    assert pq.read_table(exported).num_rows == 4
    bad_time = farm("results", job_id, "--since", "yesterday")
    assert bad_time.returncode == 2 and "--since: 'yesterday' is neither a duration nor a time" in bad_time.stderr
    # Failures are grouped by kind, without parsing error text: the injected fault is a render failure.
    by_kind = json.loads(farm("results", job_id, "--error-kind", "render", "-f", "json").stdout)
    assert [(r["status"], r["error_kind"]) for r in by_kind] == [("failed", "render")]
    assert json.loads(farm("results", job_id, "--error-kind", "storage", "-f", "json").stdout) == []
    bad_kind = farm("results", job_id, "--error-kind", "gremlins")
    assert bad_kind.returncode == 2 and "gremlins" in bad_kind.stderr
    compact = farm("catalog", "compact", "--format", "json")
    assert compact.returncode == 0, compact.stderr
    compacted = json.loads(compact.stdout)
    assert compacted["merged_files"] >= 2 and compacted["written_files"] >= 1  # the events partition
    assert json.loads(farm("status", job_id, "--format", "json").stdout)["succeeded"] == 3

    # The failed task alone is rendered again on re-submit, and then everything succeeded.
    again = farm("submit", str(manifest), "--workers", "1", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["rendered"], json.loads(again.stdout)["already_done"]) == (1, 3)


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_job_resumes_without_rendering_any_task_twice(farm_home, write_manifest, how):
    manifest = write_manifest(JOB)
    outputs = farm_home / "outputs" / "cli"
    # Ctrl-C: rows go in batches of 4 and the rest is flushed on the way out. kill -9: no batch is
    # ever written before the kill, so every finished clip exists only in the output folder and
    # must be adopted from its commit marker.
    batch = "4" if how == "sigint" else "1000"
    # Each clip takes 0.3 s more, so the job is still running whatever the interruption's timing.
    slow = json.dumps({"prompt_contains": "clip", "action": "slow", "hang_s": 0.3})
    env = {
        **os.environ,
        "FARM_CATALOG_BATCH_ROWS": batch,
        "FARM_CATALOG_BATCH_SECONDS": "3600",
        "FARM_TEST_FAULTS": slow,
    }
    process = subprocess.Popen(
        [*FARM, "submit", str(manifest), "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while _count(outputs, "*.json") < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be interrupted"
    if how == "sigint":  # Ctrl-C: the driver flushes the catalog, says how to resume, exits 130
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr
        assert "submit the manifest again to resume" in stderr
    else:  # the driver and its embedded Ray die at once; nothing is flushed
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    finished_before = {
        p.name: p.stat().st_mtime_ns
        for p in outputs.glob("*.mp4")
        if (outputs / p.name.replace(".mp4", ".json")).exists()
    }
    assert 0 < len(finished_before) < 24

    env.pop("FARM_TEST_FAULTS")
    resumed = subprocess.Popen(
        [*FARM, "submit", str(manifest), "--workers", "2", "--format", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads(out)
    assert summary["already_done"] >= len(finished_before) and summary["failed"] == 0
    assert summary["already_done"] + summary["rendered"] == 24

    rows = ds.dataset(farm_home / "catalog" / "attempts", format="parquet", partitioning="hive").to_table()
    succeeded = Counter(r["task_id"] for r in rows.to_pylist() if r["status"] == "succeeded")
    assert len(succeeded) == 24 and set(succeeded.values()) == {1}, "a task has two successful attempts"
    # Clips finished before the interruption were not rendered again: same files, untouched.
    assert {n: (outputs / n).stat().st_mtime_ns for n in finished_before} == finished_before
    assert _count(outputs, "*.mp4") == 24 and not list(outputs.glob(".*.tmp-*"))
    if how == "sigkill":
        assert any(r["recovered"] for r in rows.to_pylist())
        # The killed farm's lock was no obstacle (the kernel dropped it); the submit that found its
        # .embedded.json recorded the job it had been running as interrupted, and stopped cleanly.
        state = json.loads((farm_home / "catalog" / ".embedded.json").read_text())
        assert state["state"] == "stopped" and state["pid"] == resumed.pid
        killed = [j for j in json.loads(farm("jobs", "--format", "json").stdout) if j["job_id"] != summary["job_id"]]
        assert [j["state"] for j in killed] == ["interrupted"]


def test_a_ctrl_c_that_ray_swallows_still_stops_following_the_job(monkeypatch):
    """Ray's C++ wait turns a KeyboardInterrupt into a status that some of its paths drop: the
    command's handler remembers the signal, and the follow loop raises it between polls."""
    from types import SimpleNamespace

    from farm import interrupts, local
    from farm.jobs import JobProgress
    from farm.task import JobState

    running = JobProgress("j", 10, 1, 0, 2, 7, 0, JobState.RUNNING, 1.0, 9.0, 2)
    finished = JobProgress("j", 10, 10, 0, 0, 0, 0, JobState.FINISHED, 2.0, 0.0, 2)
    polls = []

    def swallowing_call(progress, timeout=None):  # a poll during which Ctrl-C comes and is dropped
        polls.append(progress)
        if len(polls) == 2:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass
        return finished if len(polls) >= 5 else progress  # followed to its end: the Ctrl-C was lost

    monkeypatch.setattr(local, "call", swallowing_call)
    controller = SimpleNamespace(progress=SimpleNamespace(remote=lambda job_id: running))
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            local.follow(controller, running, poll_s=0.01)
        assert len(polls) == 2  # the next turn, not the job's end (it never ends here)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupts.install()  # clears the remembered signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
