"""The scheduler against a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster):
nodes offering different pools, routing, priorities, nodes removed and added, renderers and the
controller killed, poison tasks, cancel — each checked for exactly-once on the catalog and outputs."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from farm import api
from farm.catalog import Catalog
from farm.controller import CONTROLLER_NAME, NAMESPACE
from farm.errors import FarmError
from farm.faults import Fault

pytestmark = pytest.mark.ray

SMALL = {"farm_pool:small": 2, "farm_gpu:L4": 1, "farm_vram_gb": 24, "farm_cost_cents_per_hour": 80}
BIG = {"farm_pool:big": 1, "farm_gpu:H100": 1, "farm_vram_gb": 80, "farm_cost_cents_per_hour": 400}

JOB = """
campaign: {name}
prompt: "{name} clip {{n}}"
render: {{width: 32, height: 32, frames: 5, steps: 2}}
axes:
  n: [{ns}]
priority: {priority}
retries: 2
"""


@pytest.fixture(scope="module")
def cluster(ray_session):
    """A head node plus a 'small' pool node (2 slots) and a 'big' pool node (1 slot)."""
    from ray.cluster_utils import Cluster

    if ray_session.is_initialized():
        ray_session.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {"small": c.add_node(num_cpus=2, resources=SMALL), "big": c.add_node(num_cpus=1, resources=BIG)}
    c.wait_for_nodes()
    ray_session.init(address=c.address, logging_level=logging.ERROR, log_to_driver=False)
    c.farm_nodes = nodes
    yield c
    ray_session.shutdown()
    c.shutdown()


@pytest.fixture
def farm(cluster, farm_home, write_manifest):
    """Per test: a fresh catalog, and no controller left from the test before."""
    yield cluster
    import ray

    from tests.conftest import stop_controller

    stop_controller(ray)


def manifest(write_manifest, name: str, n: int, priority: int = 0, extra: str = "") -> str:
    text = JOB.format(name=name, ns=", ".join(str(i) for i in range(n)), priority=priority) + extra
    return write_manifest(text, name=f"{name}.yaml")


def assert_exactly_once(farm_home, job_ids: list[str]) -> dict:
    """Every task of the jobs: one succeeded attempt or a final failure, never both, never two
    successes; every success has its clip and marker, no clip exists without its success."""
    catalog = Catalog(farm_home / "catalog")
    outputs = {catalog.job(j).output for j in job_ids}
    rows = [r for r in catalog.attempts().to_pylist() if r["output_root"] in outputs]
    ok = Counter(r["task_id"] for r in rows if r["status"] == "succeeded")
    final_failed = {r["task_id"] for r in rows if r["status"] == "failed" and r["final"] and r["job_id"] in job_ids}
    assert set(ok.values()) <= {1}, f"tasks with two successes: {[t for t, n in ok.items() if n > 1]}"
    assert not set(ok) & final_failed
    wanted = {t for j in job_ids for t in catalog.job(j).task_ids}
    assert wanted == set(ok) | final_failed, "a task ended neither succeeded nor failed"
    for job_id in job_ids:
        output = catalog.job(job_id).output
        clips = {p.stem for p in Path(output).glob("*.mp4")}
        mine = set(catalog.job(job_id).task_ids)
        assert clips & mine == set(ok) & mine
    return {"rows": rows, "ok": ok, "failed": final_failed}


def submit_in_background(path, **kw):
    box: dict = {}

    def run():
        try:
            box["outcome"] = api.submit(path, address="auto", **kw)
        except BaseException as exc:  # the test reads it
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def succeeded_so_far(farm_home) -> int:
    outputs = list((farm_home / "outputs").rglob("*.json"))
    return len(outputs)


def node_ids_by_pool(cluster) -> dict[str, str]:
    return {pool: node.node_id for pool, node in cluster.farm_nodes.items()}


def test_routing_fits_and_prefers_the_cheapest_pool(farm, farm_home, write_manifest):
    path = manifest(
        write_manifest,
        "routing",
        6,
        extra="tasks:\n"
        "  - {prompt: 'heavy a', requirements: {min_vram_gb: 60}}\n"
        "  - {prompt: 'heavy b', requirements: {min_vram_gb: 60}}\n",
    )
    plan = api.plan(path, address="auto")
    assert plan.routes == {"small": 6, "big": 2}
    outcome = api.submit(path, address="auto")
    assert (outcome.run.succeeded, outcome.run.failed) == (8, 0)
    nodes = node_ids_by_pool(farm)
    rows = Catalog(farm_home / "catalog").attempts().to_pylist()
    assert {r["node_id"] for r in rows if "heavy" in r["prompt"]} == {nodes["big"]}
    # Light tasks may run on either pool (a free big slot is not left idle while small renderers
    # still load); which pool is preferred is the plan's routing above and a scheduler unit test.
    assert {r["node_id"] for r in rows if "clip" in r["prompt"]} <= {nodes["small"], nodes["big"]}
    pools = {p["pool"]: p for p in api.pools("auto")}
    assert (pools["small"]["slots"], pools["big"]["vram_gb"], pools["big"]["gpu_type"]) == (2, 80, "H100")
    assert_exactly_once(farm_home, [outcome.job_id])


def test_a_task_no_pool_can_take_is_a_plan_error(farm, farm_home, write_manifest):
    path = manifest(write_manifest, "toobig", 1, extra="requirements: {min_vram_gb: 100}\n")
    with pytest.raises(FarmError, match=r"needs min_vram_gb=100 and no pool offers that \(big: H100, 80 GB"):
        api.plan(path, address="auto")


def test_an_attempt_that_runs_out_of_gpu_memory_is_retried_on_a_pool_with_more_vram(
    farm, farm_home, write_manifest, faults
):
    faults(Fault("oom clip", fail_attempts=1, action="oom"))
    outcome = api.submit(manifest(write_manifest, "oom", 1), address="auto")
    assert (outcome.run.succeeded, outcome.run.failed) == (1, 0)
    nodes = node_ids_by_pool(farm)
    rows = sorted(assert_exactly_once(farm_home, [outcome.job_id])["rows"], key=lambda r: r["attempt"])
    assert [(r["attempt"], r["status"], r["error_kind"], r["node_id"]) for r in rows] == [
        (1, "failed", "oom", nodes["small"]),  # the cheapest pool first: 24 GB
        (2, "succeeded", None, nodes["big"]),  # the same variant again, on the pool with more VRAM
    ]
    assert rows[1]["precision"] == "bf16" and rows[1]["run_variant"] == "bf16 compute=float32 cpu"


def test_priorities_across_jobs_sharing_one_controller(farm, farm_home, write_manifest, faults):
    faults(Fault("clip", action="slow", hang_s=0.3))
    low_thread, low = submit_in_background(manifest(write_manifest, "low", 24))
    wait_for(lambda: succeeded_so_far(farm_home) >= 2, what="the low-priority job to start")
    high = api.submit(manifest(write_manifest, "high", 6, priority=10), address="auto")
    high_done = time.time()
    low_thread.join(timeout=300)
    assert "error" not in low, low.get("error")
    assert high.run.succeeded == 6 and low["outcome"].run.succeeded == 24
    rows = Catalog(farm_home / "catalog").attempts().to_pylist()
    low_after = [r for r in rows if r["job_id"] == low["outcome"].job_id and r["finished_at"].timestamp() > high_done]
    assert len(low_after) >= 3, "the high-priority job did not overtake the low-priority one"
    assert_exactly_once(farm_home, [high.job_id, low["outcome"].job_id])


def test_renderers_killed_at_random_and_a_node_lost_then_another_added(farm, farm_home, write_manifest, faults):
    import ray

    faults(Fault("clip", action="slow", hang_s=0.3))
    thread, box = submit_in_background(manifest(write_manifest, "chaos", 30))
    wait_for(lambda: succeeded_so_far(farm_home) >= 3, what="progress")
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    victims = [r for r in ray.get(controller.renderer_stats.remote()) if r["ready"]][:2]
    for victim in victims:  # as the OOM killer would
        os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: succeeded_so_far(farm_home) >= 8, what="progress after the kills")
    small = farm.farm_nodes["small"]
    farm.remove_node(small)  # a spot instance taken back mid-job
    farm.farm_nodes["small"] = farm.add_node(num_cpus=2, resources=SMALL)  # and a new one joins
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    outcome = box["outcome"]
    assert outcome.run.failed == 0
    assert api.status(outcome.job_id).counts == {"succeeded": 30, "failed": 0, "pending": 0}
    checked = assert_exactly_once(farm_home, [outcome.job_id])
    assert any(r["status"] == "interrupted" for r in checked["rows"]), "no attempt was interrupted"


def test_a_task_that_kills_every_renderer_fails_and_the_job_goes_on(farm, farm_home, write_manifest, faults):
    path = manifest(write_manifest, "poison", 5, extra="tasks:\n  - {prompt: 'poison pill'}\n")
    faults(Fault("pill", action="exit"))
    outcome = api.submit(path, address="auto")
    assert (outcome.run.succeeded, outcome.run.failed) == (5, 1)
    checked = assert_exactly_once(farm_home, [outcome.job_id])
    (row,) = [r for r in checked["rows"] if r["prompt"] == "poison pill" and r["final"]]
    assert row["status"] == "failed" and "renderers died running it" in row["error"]


def test_controller_killed_mid_job_is_restarted_and_finishes_the_job_once(farm, farm_home, write_manifest, faults):
    import ray

    faults(Fault("clip", action="slow", hang_s=0.3))
    thread, box = submit_in_background(manifest(write_manifest, "phoenix", 20))
    wait_for(lambda: succeeded_so_far(farm_home) >= 4, what="progress")
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    first = ray.get(controller.ping.remote())
    os.kill(first["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    second = ray.get(controller.ping.remote())
    assert second["pid"] != first["pid"] and box["outcome"].job_id in second["restored"]
    assert_exactly_once(farm_home, [box["outcome"].job_id])
    status = api.status(box["outcome"].job_id)
    assert status.counts == {"succeeded": 20, "failed": 0, "pending": 0} and status.state == "finished"


def test_cancel_stops_a_job_within_seconds_and_resubmit_resumes(farm, farm_home, write_manifest, faults):
    path = manifest(write_manifest, "stopme", 30)
    faults(Fault("clip", action="slow", hang_s=0.5))
    thread, box = submit_in_background(path)
    wait_for(lambda: succeeded_so_far(farm_home) >= 3, what="progress")
    job_id = Catalog(farm_home / "catalog").jobs()[-1].job_id
    asked = time.monotonic()
    api.cancel(job_id, address="auto")
    thread.join(timeout=60)
    assert time.monotonic() - asked < 15
    assert "error" not in box, box.get("error")
    assert box["outcome"].run.state == "cancelled"
    assert api.status(job_id).state == "cancelled"
    done_before = api.status(job_id).counts["succeeded"]
    assert 0 < done_before < 30
    faults()  # the rest at full speed
    again = api.submit(path, address="auto")
    assert len(again.plan.done) == done_before and again.run.succeeded == 30 - done_before
    assert_exactly_once(farm_home, [again.job_id])
