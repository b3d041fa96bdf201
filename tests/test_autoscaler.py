"""farm with Ray's real autoscaler: the head runs Ray's monitor with a cluster-launcher config whose
provider is Ray's `fake_multinode` (Ray's own provider for testing autoscaling on one machine: it
starts and stops real raylet processes where a cloud provider would start and stop machines). No
node offers the pool the job needs until the controller's request makes the autoscaler launch
one; when the queue drains the controller lets the renderer go and the autoscaler removes the
node. Token authentication stays on throughout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from farm.catalog import Catalog
from tests.raycluster import RayCliCluster
from tests.test_remote import farm_json, wait_until, write_manifest

pytestmark = pytest.mark.ray

BURST = {"farm_pool:burst": 1, "farm_gpu:H200": 1, "farm_vram_gb": 141, "farm_cost_cents_per_hour": 900}


def _launcher_config(port: int) -> dict:
    return {
        "cluster_name": "farm-autoscaler-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s: a node without a renderer or request goes quickly
        # As Ray's own fake_multinode example: the provider starts Ray on a node itself, so no
        # SSH updater runs, and a node's id stands for its IP.
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",  # the name fake_multinode gives the node it runs on
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "burst": {"resources": {"CPU": 1, **BURST}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaled(ray_session, tmp_path, shared_model_cache):
    if ray_session.is_initialized():  # this test's processes are clients only
        ray_session.shutdown()
    config = tmp_path / "autoscaler.yaml"
    cluster = RayCliCluster(
        env={
            "RAY_FAKE_CLUSTER": "1",
            "FARM_CATALOG": str(tmp_path / "cluster-catalog"),
            "FARM_MODELS_DIR": str(shared_model_cache),
            "FARM_METRICS_ADDRESS": "127.0.0.1:0",
            "FARM_CLUSTER_CONFIG": str(config),
            "FARM_AUTOSCALE_INTERVAL_S": "1",
            "FARM_SCALE_DOWN_IDLE_S": "2",
        }
    )
    config.write_text(yaml.safe_dump(_launcher_config(cluster.port)))
    cluster.tmp = tmp_path
    try:
        cluster.start_head(f"--autoscaling-config={config}")
        yield cluster
    finally:
        cluster.stop()


def _burst_nodes(cluster) -> list[str]:
    """Alive nodes offering the burst pool, as Ray sees them."""
    script = (
        f"import json, ray\nray.init(address='{cluster.address}', logging_level='ERROR')\n"
        "print('NODES', json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] "
        "and 'farm_pool:burst' in n['Resources']]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=cluster.client_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # Ray prints the autoscaler's events to a driver's stdout too: take our line only.
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("NODES "))[6:])


def test_the_autoscaler_launches_the_pool_farm_asks_for_and_removes_it_when_drained(autoscaled):
    cluster = autoscaled
    assert _burst_nodes(cluster) == []
    path = write_manifest(cluster, "autoscaled", 4, extra="requirements: {min_vram_gb: 100}\n")
    handed = farm_json(cluster, "submit", str(path), "--address", cluster.address)
    assert handed["to_render"] == 4

    seen: set[str] = set()  # every burst node the autoscaler started

    def burst_nodes() -> list[str]:
        nodes = _burst_nodes(cluster)
        seen.update(nodes)
        return nodes

    wait_until(burst_nodes, 240, "the autoscaler to launch a burst node")

    def job_over() -> dict | None:
        burst_nodes()
        status = farm_json(cluster, "status", handed["job_id"], "--address", cluster.address)
        return status if status["state"] in ("finished", "failed") else None

    final = wait_until(job_over, 300, "the job on the launched nodes")
    assert (final["succeeded"], final["failed"]) == (4, 0)
    attempts = Catalog(cluster.tmp / "cluster-catalog").attempts(handed["job_id"]).to_pylist()
    succeeded = [r for r in attempts if r["status"] == "succeeded"]
    assert len(succeeded) == 4 and {r["node_id"] for r in succeeded} <= seen  # only launched nodes render
    assert 1 <= len(seen) <= 2  # the config's max_workers

    # The queue drained: request withdrawn, renderer released, and the autoscaler removes the nodes.
    wait_until(lambda: _burst_nodes(cluster) == [], 180, "the autoscaler to remove the burst nodes")
