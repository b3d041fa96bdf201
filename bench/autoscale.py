"""Autoscaling: what deciding costs the controller, and how fast a pool comes and goes.

(a) Decision cost: the controller's `_autoscale` step — the scheduler's backlog by requirements,
    then `scaling.plan` over the pools with a deadline — on a queue of N tasks in several jobs
    and requirement groups, timed over many calls (it runs every FARM_AUTOSCALE_INTERVAL_S).
(b) Reaction, with Ray's real autoscaler on this machine (`fake_multinode` provider: it starts
    and stops raylet processes where a cloud starts machines; so launch time here excludes a
    cloud's VM boot and image pull): a job needing a pool that has no node yet is submitted
    detached; timestamps of the first node alive, first clip, every node alive, job finished,
    and every node removed after the queue drained (FARM_SCALE_DOWN_IDLE_S plus the config's
    idle_timeout_minutes).

Writes bench/results/autoscale-<timestamp>.json.

    .venv/bin/python bench/autoscale.py [--tasks 100000] [--clips 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
BURST = {"farm_pool:burst": 1, "farm_gpu:H200": 1, "farm_vram_gb": 141, "farm_cost_cents_per_hour": 900}


def decision_cost(tasks: int, calls: int = 200) -> dict:
    from farm.scaling import PoolScaling
    from farm.scaling import plan as scaling_plan
    from farm.scheduler import Scheduler
    from farm.task import ModelRef, Pool, RenderSettings, Requirements, Task

    pools = [
        PoolScaling(Pool("l4", "L4", 24, 0.80), 3, 1, 0, 8, 40.0),
        PoolScaling(Pool("gpu24", "A10G", 24, 1.01), 2, 1, 0, 8, 45.0),
        PoolScaling(Pool("a100_80", "A100", 80, 5.12), 0, 8, 0, 2, None),
    ]
    scheduler = Scheduler()
    for p in pools:
        scheduler.add_pool(p.pool)
    model = ModelRef("tiny", "builtin", "/m", "builtin:bench", "WanPipeline")
    needs = [Requirements(), Requirements(min_vram_gb=40), Requirements(gpu_type="L4"), Requirements(min_vram_gb=24)]
    jobs = 10
    for j in range(jobs):
        batch = [
            Task(f"t{j}-{i}", "p", i, model, RenderSettings(64, 64, 9, 8, 4, 5.0), (), needs=needs[i % len(needs)])
            for i in range(tasks // jobs)
        ]
        scheduler.add_job(f"job{j}", batch)
    started = time.perf_counter()
    for _ in range(calls):
        result = scaling_plan(pools, by_needs=scheduler.backlog_by_needs(), deadline_s=6 * 3600.0)
    per_call_ms = (time.perf_counter() - started) / calls * 1000
    return {
        "queued_tasks": tasks,
        "jobs": jobs,
        "requirement_groups": len(needs),
        "pools": len(pools),
        "calls": calls,
        "ms_per_decision": round(per_call_ms, 3),
        "decided_workers": {d.pool: d.target_workers for d in result.decisions},
        "cost_dollars": round(result.cost_dollars, 2),
        "reachable": result.reachable,
    }


def reaction(clips: int) -> dict:
    import yaml

    from tests.raycluster import RayCliCluster

    tmp = Path(tempfile.mkdtemp(prefix="farm-bench-autoscale-"))
    config = tmp / "autoscaler.yaml"
    cluster = RayCliCluster(
        env={
            "RAY_FAKE_CLUSTER": "1",
            "FARM_CATALOG": str(tmp / "catalog"),
            "FARM_MODELS_DIR": os.environ.get("FARM_MODELS_DIR", str(tmp / "models")),
            "FARM_METRICS_ADDRESS": "127.0.0.1:0",
            "FARM_CLUSTER_CONFIG": str(config),
            "FARM_AUTOSCALE_INTERVAL_S": "1",
            "FARM_SCALE_DOWN_IDLE_S": "5",
        }
    )
    idle_timeout_min = 0.1
    config.write_text(
        yaml.safe_dump(
            {
                "cluster_name": "bench",
                "max_workers": 2,
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": idle_timeout_min,
                "provider": {
                    "type": "fake_multinode",
                    "gcs_address": f"127.0.0.1:{cluster.port}",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                },
                "auth": {"ssh_user": "ubuntu"},
                "head_node_type": "ray.head.default",
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
        )
    )
    manifest = tmp / "burst.yaml"
    manifest.write_text(
        f"campaign: burst\nprompt: 'clip {{n}}'\nrender: {{width: 32, height: 32, frames: 5, "
        f"steps: 2}}\nrequirements: {{min_vram_gb: 100}}\noutput: {tmp / 'clips'}\n"
        f"axes:\n  n: [{', '.join(map(str, range(clips)))}]\n"
    )
    marks: dict[str, float] = {}
    nodes_seen: set[str] = set()
    try:
        cluster.start_head(f"--autoscaling-config={config}")
        # Ray reads its auth settings when it is first imported: this process is the cluster's client.
        os.environ.update({k: v for k, v in cluster.client_env().items() if k.startswith("RAY_AUTH")})
        import ray

        from farm import api

        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        t0 = time.monotonic()
        handed = api.submit(manifest, address=cluster.address, wait=False)
        marks["handed_over_s"] = time.monotonic() - t0
        controller = api._running_controller()
        finished_at = None
        while time.monotonic() - t0 < 600:
            now = time.monotonic() - t0
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "farm_pool:burst" in n["Resources"]]
            nodes_seen.update(alive)
            if alive:
                marks.setdefault("first_node_alive_s", now)
            if len(alive) == 2:
                marks.setdefault("both_nodes_alive_s", now)
            if finished_at is None:
                _, live = ray.get(controller.job_status.remote(handed.job_id))
                if live is not None and live.succeeded:
                    marks.setdefault("first_clip_s", now)
                if live is None or live.state == "finished":
                    finished_at = now
                    marks["job_finished_s"] = now
            elif not alive:
                marks["all_nodes_removed_s"] = now
                break
            time.sleep(0.5)
        status, _ = ray.get(controller.job_status.remote(handed.job_id))
        return {
            "clips": clips,
            "nodes_launched": len(nodes_seen),
            "succeeded": status.counts["succeeded"],
            "autoscale_interval_s": 1,
            "scale_down_idle_s": 5,
            "idle_timeout_minutes": idle_timeout_min,
            **{k: round(v, 1) for k, v in marks.items()},
            "removed_after_drain_s": round(marks["all_nodes_removed_s"] - marks["job_finished_s"], 1)
            if "all_nodes_removed_s" in marks
            else None,
        }
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="queued tasks for the decision cost")
    parser.add_argument("--clips", type=int, default=40, help="clips of the autoscaled job")
    parser.add_argument("--skip-reaction", action="store_true", help="only the decision cost")
    args = parser.parse_args()
    result = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "decision": decision_cost(args.tasks),
    }
    print(json.dumps(result["decision"], indent=2))
    if not args.skip_reaction:
        result["reaction"] = reaction(args.clips)
        print(json.dumps(result["reaction"], indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"autoscale-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
