"""farm against a real multi-process Ray cluster, as an operator runs one: `ray start --head` and
`ray start --address` worker processes offering different pools, token authentication on. Every
farm command runs as its own process, like a user's shell on another machine: a detached submit,
status polled from other processes, a worker node killed mid-job and started again, a client
without the token refused, and the controller asking Ray's autoscaler for a pool's nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from farm.catalog import Catalog
from farm.faults import Fault
from tests.raycluster import RayCliCluster

pytestmark = pytest.mark.ray

SMALL = {"farm_pool:small": 2, "farm_gpu:L4": 1, "farm_vram_gb": 24, "farm_cost_cents_per_hour": 80}
BIG = {"farm_pool:big": 1, "farm_gpu:H100": 1, "farm_vram_gb": 80, "farm_cost_cents_per_hour": 400}
BURST = {"farm_pool:burst": 1, "farm_gpu:H200": 1, "farm_vram_gb": 141, "farm_cost_cents_per_hour": 900}
# What the cluster's autoscaler could launch (cluster.yaml's available_node_types, in small).
CLUSTER_CONFIG = {
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "min_workers": 0, "max_workers": 0},
        "small": {"resources": {"CPU": 2, **SMALL}, "min_workers": 0, "max_workers": 2},
        "big": {"resources": {"CPU": 1, **BIG}, "min_workers": 0, "max_workers": 1},
        "burst": {"resources": {"CPU": 1, **BURST}, "min_workers": 0, "max_workers": 3},
    },
    "head_node_type": "head",
}
FARM = [sys.executable, "-m", "farm.cli"]


@pytest.fixture(scope="module")
def cluster(ray_session, tmp_path_factory, shared_model_cache):
    """Head (no CPUs: it only runs the controller) + a 'small' node (2 slots) + a 'big' node."""
    import yaml

    if ray_session.is_initialized():  # this test's processes are clients only
        ray_session.shutdown()
    tmp = tmp_path_factory.mktemp("remote")
    config = tmp / "cluster.yaml"
    config.write_text(yaml.safe_dump(CLUSTER_CONFIG))
    c = RayCliCluster(
        env={
            "FARM_CATALOG": str(tmp / "cluster-catalog"),  # the head's catalog: clients never see its path
            "FARM_MODELS_DIR": str(shared_model_cache),
            "FARM_METRICS_ADDRESS": "127.0.0.1:0",
            "FARM_CLUSTER_CONFIG": str(config),
            "FARM_AUTOSCALE_INTERVAL_S": "1",
            "FARM_SCALE_DOWN_IDLE_S": "2",
        }
    )
    try:
        c.start_head()
        c.add_worker("small", SMALL, 2)
        c.add_worker("big", BIG, 1)
        c.tmp = tmp
        yield c
    finally:
        c.stop()


def client_env(cluster, env: dict | None = None) -> dict:
    """A client's environment: the cluster's token, no farm home or catalog of its own (unless
    ``env`` names one)."""
    client = cluster.client_env(**(env or {}))
    for key in ("FARM_HOME", "FARM_CATALOG", "FARM_CLUSTER_CONFIG"):
        if not env or key not in env:
            client.pop(key, None)
    return client


def farm(
    cluster, *args: str, env: dict | None = None, timeout: float = 120, command: list[str] = FARM
) -> subprocess.CompletedProcess:
    """A farm command in its own process, with the cluster's token and no farm home of its own."""
    return subprocess.run(
        [*command, *args],
        env=client_env(cluster, env),
        cwd=cluster.tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def farm_json(cluster, *args: str, env: dict | None = None):
    result = farm(cluster, *args, "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_manifest(cluster, name: str, n: int, extra: str = "") -> Path:
    path = cluster.tmp / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        campaign: {name}
        prompt: "{name} clip {{n}}"
        render: {{width: 32, height: 32, frames: 5, steps: 2}}
        axes:
          n: [{", ".join(str(i) for i in range(n))}]
        output: {cluster.tmp / "clips" / name}
        retries: 2
        """)
        + extra
    )
    return path


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_detached_submit_survives_a_lost_worker_node_exactly_once(cluster, faults):
    faults(Fault("remote", action="slow", hang_s=1.5))  # ~8 s on 3 slots
    path = write_manifest(cluster, "remote", 16)
    handed = farm_json(cluster, "submit", str(path), "--address", cluster.address)
    job_id = handed["job_id"]
    assert handed["state"] == "running" and handed["to_render"] == 16  # returned while the job runs

    def status() -> dict:
        return farm_json(cluster, "status", job_id, "--address", cluster.address)

    wait_until(lambda: status()["succeeded"] >= 3, 180, "the first clips")
    killed = cluster.kill_node("small")  # a workstation crashes mid-job …
    assert killed >= 2
    time.sleep(2)
    cluster.restart_worker("small")  # … and comes back
    final = wait_until(lambda: (s := status())["state"] in ("finished", "failed") and s, 300, "the job to end")
    assert (final["succeeded"], final["failed"], final["pending"]) == (16, 0, 0)
    assert farm_json_with_an_event_after_it(cluster, "status", job_id) == final

    rows = farm_json(cluster, "results", job_id, "--address", cluster.address)
    assert len(rows) == 16 and {r["status"] for r in rows} == {"succeeded"}
    assert all(Path(r["output_uri"]).is_file() for r in rows)
    # Exactly once, on the head's catalog (which the client never named) and on disk.
    catalog = Catalog(cluster.tmp / "cluster-catalog")
    attempts = catalog.attempts(job_id).to_pylist()
    successes = Counter(r["task_id"] for r in attempts if r["status"] == "succeeded")
    assert set(successes.values()) == {1} and len(successes) == 16
    assert any(r["status"] == "interrupted" for r in attempts), "the killed node was running tasks"
    assert len(list((cluster.tmp / "clips" / "remote").glob("*.mp4"))) == 16
    # The client keeps no catalog of its own: everything came through the cluster.
    assert not (cluster.tmp / "farm-data").exists()


# A farm command, then what CI once caught by chance: a cluster event ("node … marked dead")
# published to every driver just after the command printed its JSON and before its process exited.
EVENT_AFTER_THE_OUTPUT = """
import sys, time
from ray._private.utils import publish_error_to_driver
from ray._raylet import GcsClient
from farm import cli
try:
    cli.main()
except SystemExit as exit_:
    code = exit_.code
publish_error_to_driver("node_died", "farm-test: a node was marked dead", GcsClient(address=sys.argv[-1]))
time.sleep(3)  # Ray's listener thread would print it now, had the command left Ray connected
sys.exit(code)
"""


def farm_json_with_an_event_after_it(cluster, *args: str):
    """farm_json, with a cluster event published to every driver once the command has printed."""
    command = [sys.executable, "-c", EVENT_AFTER_THE_OUTPUT]
    result = farm(cluster, *args, "--format", "json", "--address", cluster.address, command=command)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # the JSON alone, nothing after it


@pytest.mark.parametrize("case", ["wrong-token", "token-mode-without-token", "no-auth-settings"])
def test_a_client_without_the_token_is_refused(cluster, tmp_path, case):
    env = cluster.client_env(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    if case == "wrong-token":
        env["RAY_AUTH_TOKEN"] = "not-the-token"
    else:
        env.pop("RAY_AUTH_TOKEN")
    if case == "no-auth-settings":
        env.pop("RAY_AUTH_MODE")
    result = subprocess.run(
        [*FARM, "jobs", "--address", cluster.address], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    if case != "token-mode-without-token":  # the cluster itself said no
        assert "refused this client" in lines[0]


def _requested_bundles(cluster) -> list[dict]:
    """The standing request in Ray's autoscaler channel, read as the autoscaler reads it."""
    script = (
        "import json, ray\n"
        "from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL as key\n"
        "from ray.experimental.internal_kv import _internal_kv_get\n"
        f"ray.init(address='{cluster.address}', logging_level='ERROR')\n"
        "value = _internal_kv_get(key)\n"
        "print(json.dumps(json.loads(value) if value else None))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=cluster.client_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]) or []


def test_the_controller_asks_the_autoscaler_for_the_pool_its_backlog_needs(cluster):
    path = write_manifest(cluster, "burst", 4, extra="requirements: {min_vram_gb: 100}\n")
    # Only the burst pool (141 GB) fits, and it has no node yet: the plan routes there anyway,
    # because the cluster's autoscaler can start one.
    plan = farm_json(cluster, "plan", str(path), "--address", cluster.address)
    assert plan["routes"] == {"burst": 4}
    handed = farm_json(cluster, "submit", str(path), "--address", cluster.address)

    def burst_request() -> int:
        return sum(1 for b in _requested_bundles(cluster) if b == {"farm_pool:burst": 1})

    # 4 tasks, 1 slot a node, at most 3 nodes: three nodes asked for.
    assert wait_until(lambda: burst_request() == 3, 60, "the request for burst nodes")
    pools = {p["pool"]: p for p in farm_json(cluster, "pools", "--address", cluster.address)}
    assert pools["burst"]["target_nodes"] == 3 and pools["burst"]["nodes"] == []
    cluster.add_worker("burst", BURST, 1)  # what the autoscaler does with the request
    final = wait_until(
        lambda: (
            (s := farm_json(cluster, "status", handed["job_id"], "--address", cluster.address))["state"] == "finished"
            and s
        ),
        240,
        "the burst job",
    )
    assert final["succeeded"] == 4
    # The queue drained and stayed empty past the idle grace: the request is withdrawn.
    wait_until(lambda: _requested_bundles(cluster) == [], 60, "the request to be withdrawn")
    # ... and its renderer is stopped, so the node holds nothing and the autoscaler can remove it.
    assert wait_until(
        lambda: (
            not {p["pool"]: p for p in farm_json(cluster, "pools", "--address", cluster.address)}["burst"]["renderers"]
        ),
        60,
        "the burst renderer to be released",
    )
    assert wait_until(lambda: _available(cluster, "farm_pool:burst") == 1.0, 60, "the burst slot to be free")


def _available(cluster, resource: str) -> float:
    script = (
        f"import ray\nray.init(address='{cluster.address}', logging_level='ERROR')\n"
        f"print(ray.available_resources().get({resource!r}, 0.0))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=cluster.client_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


def test_ctrl_c_leaves_the_job_which_a_cancel_from_another_shell_stops_and_wait_resumes(cluster, faults):
    """One job through a user's shells: followed with --wait, left with Ctrl-C (it goes on),
    cancelled from another shell (dispatch stops), resumed by submitting again with --wait."""
    import os
    import signal

    faults(Fault("followed", action="slow", hang_s=2.0))
    path = write_manifest(cluster, "followed", 24)  # 16 s on 3 slots: longer than all the steps take
    follower = subprocess.Popen(
        [*FARM, "submit", str(path), "--address", cluster.address, "--wait"],
        env=client_env(cluster),
        cwd=cluster.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def followed_job() -> str | None:
        listed = farm(cluster, "jobs", "--address", cluster.address, "--format", "json")
        if listed.returncode != 0:  # the submit has not started the cluster's controller yet
            return None
        return next((j["job_id"] for j in json.loads(listed.stdout) if j["campaign"] == "followed"), None)

    job_id = wait_until(followed_job, 120, "the followed job")

    def status() -> dict:
        return farm_json(cluster, "status", job_id, "--address", cluster.address)

    # Ctrl-C on the following client stops the following, not the job.
    assert follower.poll() is None, "the job ended before the test could interrupt its client"
    os.kill(follower.pid, signal.SIGINT)
    _, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 130
    assert f"stopped following; job {job_id} goes on on the cluster" in stderr
    left_at = status()["succeeded"]
    going_on = wait_until(lambda: (s := status())["succeeded"] > left_at and s, 120, "clips without a client")
    assert going_on["state"] == "running"

    # Cancelled from another shell: dispatch stops, the catalog says so, and submitting resumes.
    cancelled = farm(cluster, "cancel", job_id, "--address", cluster.address)
    assert cancelled.returncode == 0, cancelled.stderr
    stopped = wait_until(lambda: (s := status())["state"] == "cancelled" and s, 60, "the cancel")
    assert 1 <= stopped["succeeded"] < 24
    faults()  # the rest at full speed
    resumed = farm(
        cluster, "submit", str(path), "--address", cluster.address, "--wait", "--format", "json", timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)  # --wait stays until the job ends and reports it
    assert summary["state"] == "finished" and summary["failed"] == 0
    # A clip its renderer finished as the grace ran out and it was stopped is committed but not
    # counted in the cancelled job: the re-submit adopts it rather than render it again.
    assert summary["already_done"] >= stopped["succeeded"]
    assert summary["already_done"] + summary["rendered"] == 24
    rows = farm_json(cluster, "results", summary["job_id"], "--address", cluster.address)
    assert len(rows) == 24 and {r["status"] for r in rows} == {"succeeded"}
