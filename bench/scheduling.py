"""farm's scheduler against Ray Data (map_batches with an actor pool) and a plain
ray.util.ActorPool, on the same local Ray, the same workers (farm's Renderer) and the same tasks.

Workloads: (a) ``fake:sleep-50ms`` — a fake model, named as such, that sleeps 50 ms per clip
(then the clip is encoded and written like any other); (b) the real tiny Wan model.
Efficiency = (sum of task busy time / workers) / makespan, where busy time is what the worker
spent on a task (generate + encode + write) and makespan runs from the first task's start to the
last task's end, for all three alike. Also measured for farm: driver and controller CPU seconds
per task, the controller's memory, a large queue on the no-op fake model, and re-submitting a
finished job. Writes bench/results/scheduling-<timestamp>.json.
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

RESULTS = Path(__file__).resolve().parent / "results"
WORKERS = 2


def proc_stats(pid: int) -> dict:
    """CPU seconds and resident memory of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks, "rss_mb": rss_kb / 1024}


def write_manifest(folder: Path, name: str, model: str, count: int, size: str) -> Path:
    w, h, f = size.split("x")
    path = folder / f"{name}.yaml"
    path.write_text(
        f"campaign: {name}\nmodel: '{model}'\nprompt: 'bench {name}'\n"
        f"render: {{width: {w}, height: {h}, frames: {f}, steps: 4}}\n"
        f"seeds: {{count: {count}}}\nretries: 0\n"
    )
    return path


def efficiency(results) -> dict:
    busy = sum(r.timings.generate_s + r.timings.encode_s + r.timings.write_s for r in results)
    makespan = max(r.finished_at for r in results) - min(r.started_at for r in results)
    return {
        "tasks": len(results),
        "makespan_s": round(makespan, 3),
        "busy_s": round(busy, 3),
        "efficiency": round(busy / WORKERS / makespan, 4),
    }


def run_farm(manifest: Path) -> dict:
    import ray

    from farm import api
    from farm.catalog import Catalog
    from farm.controller import CONTROLLER_NAME, NAMESPACE, get_or_start_controller

    controller = get_or_start_controller(os.environ["FARM_CATALOG"])
    pid = ray.get(controller.ping.remote())["pid"]
    before, driver_before = proc_stats(pid), time.process_time()
    outcome = api.submit(manifest)
    after, driver_after = proc_stats(pid), time.process_time()
    rows = Catalog(os.environ["FARM_CATALOG"]).attempts(outcome.job_id).to_pylist()
    busy = sum(r["generate_s"] + r["encode_s"] + r["write_s"] for r in rows)
    makespan = (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()
    n = len(rows)
    out = {
        "tasks": n,
        "makespan_s": round(makespan, 3),
        "busy_s": round(busy, 3),
        "efficiency": round(busy / WORKERS / makespan, 4),
        "controller_cpu_ms_per_task": round((after["cpu_s"] - before["cpu_s"]) / n * 1000, 3),
        "driver_cpu_ms_per_task": round((driver_after - driver_before) / n * 1000, 3),
        "controller_rss_mb": round(after["rss_mb"], 1),
    }
    ray.get(controller.shutdown.remote())
    ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
    return out


def tasks_of(manifest: Path):
    from farm.expand import expand
    from farm.manifest import load_manifest

    mf = load_manifest(manifest)
    return mf, expand(mf).tasks


def run_actor_pool(manifest: Path, out_dir: Path) -> dict:
    import ray
    from ray.util import ActorPool

    from farm.render import Renderer
    from farm.storage import OutputTarget

    mf, tasks = tasks_of(manifest)
    target = OutputTarget(str(out_dir))
    actors = [ray.remote(Renderer).options(num_cpus=1).remote(mf.model, None, 1) for _ in range(WORKERS)]
    ray.get([a.info.remote() for a in actors])
    pool = ActorPool(actors)
    results = list(pool.map_unordered(lambda a, t: a.render.remote(t, 1, target), tasks))
    for a in actors:
        ray.kill(a)
    return efficiency(results)


def run_ray_data(manifest: Path, out_dir: Path) -> dict:
    import ray
    import ray.data

    from farm.render import Renderer, result_from_record, result_record
    from farm.storage import OutputTarget

    mf, tasks = tasks_of(manifest)
    tasks_ref = ray.put(tasks)
    target = OutputTarget(str(out_dir))
    model = mf.model

    class RenderBatch:
        def __init__(self) -> None:
            self.renderer = Renderer(model, None, 1)
            self.tasks = ray.get(tasks_ref)

        def __call__(self, batch):
            records = [result_record(self.renderer.render(self.tasks[int(i)], 1, target)) for i in batch["id"]]
            return {"result": [json.dumps(r) for r in records]}

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    dataset = ray.data.range(len(tasks), override_num_blocks=max(WORKERS, len(tasks) // 10))
    # Half a CPU each, so Ray Data's read tasks still find a CPU beside the two workers (with a
    # whole CPU each they would wait forever on this 2-CPU cluster).
    rows = dataset.map_batches(RenderBatch, batch_size=1, concurrency=WORKERS, num_cpus=0.5).take_all()
    return efficiency([result_from_record(json.loads(r["result"])) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sleep-tasks", type=int, default=2000)
    parser.add_argument("--tiny-tasks", type=int, default=400)
    parser.add_argument("--big-queue", type=int, default=100_000, help="tasks of the no-op queue test (0: skip)")
    parser.add_argument("--resubmit", type=int, default=10_000, help="tasks of the re-submit test (0: skip)")
    args = parser.parse_args()
    import ray

    results: dict = {
        "benchmark": "scheduling",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workers": WORKERS,
    }
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        folder = Path(tmp)
        os.environ["FARM_HOME"] = str(folder / "home")
        os.environ["FARM_CATALOG"] = str(folder / "home" / "catalog")
        ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        for label, model, count, size in (
            ("a_sleep_50ms", "fake:sleep-50ms", args.sleep_tasks, "16x16x1"),
            ("b_tiny_wan", "tiny", args.tiny_tasks, "64x64x9"),
        ):
            if not count:
                continue
            manifest = write_manifest(folder, label.replace("_", "-"), model, count, size)
            results[label] = {
                "farm": run_farm(manifest),
                "ray_data": run_ray_data(manifest, folder / f"{label}-data"),
                "actor_pool": run_actor_pool(manifest, folder / f"{label}-pool"),
            }
            print(label, json.dumps(results[label]), flush=True)
        if args.resubmit:
            from farm import api

            manifest = write_manifest(folder, "resubmit", "fake:noop", args.resubmit, "16x16x1")
            first = time.perf_counter()
            api.submit(manifest)
            first_s = time.perf_counter() - first
            again = time.perf_counter()
            outcome = api.submit(manifest)
            results["resubmit_finished_job"] = {
                "tasks": args.resubmit,
                "first_submit_s": round(first_s, 2),
                "resubmit_s": round(time.perf_counter() - again, 2),
                "rendered_again": outcome.run.succeeded if outcome.run else 0,
            }
            print("resubmit", json.dumps(results["resubmit_finished_job"]), flush=True)
        if args.big_queue:
            from farm import api

            manifest = write_manifest(folder, "bigqueue", "fake:noop", args.big_queue, "16x16x1")
            started = time.perf_counter()
            plan = api.plan(manifest)
            plan_s = time.perf_counter() - started
            big = run_farm(manifest)
            big.update(plan_s=round(plan_s, 2), planned=len(plan.tasks))
            results["big_queue_noop"] = big
            print("big", json.dumps(big), flush=True)
        ray.shutdown()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scheduling-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
