"""farm's scheduler against Ray Data (map_batches with an actor pool) and a plain
ray.util.ActorPool, on the same local Ray, the same workers (farm's Renderer) and the same tasks.

Workloads: (a) ``fake:sleep-50ms`` — a fake model, named as such, that sleeps 50 ms per clip
(then the clip is encoded and written like any other); (b) the real tiny Wan model (64x64, 9
frames, 4 steps). Each system runs each workload ``--runs`` times in rounds: one run of every
system a round, in an order from a Williams design (over 6 rounds every system runs first, second
and last twice, and follows each other system twice), so a machine that slows down or speeds up
during the benchmark favours no system. Reported: the median of each system's runs, and, paired
within rounds, the median of farm's makespan ÷ each other system's in the same round (the
machine's drift between rounds cancels there).

Figures: makespan, from the first task's start to the last task's end, for all three alike;
makespan ÷ ideal, where ideal = the time per task of one Renderer rendering in this process with
no scheduler at all × tasks ÷ workers; farm's makespan ÷ the best of the other two; busy-time
efficiency ((sum of generate + encode + write) / workers / makespan) as a secondary figure; and
for farm the controller's CPU per task (the controller actor's process, from /proc), split into
admission (until submit returns) and the run after it, and the submitting driver's CPU per task.
The ActorPool's driver CPU per task is reported beside it: the same Ray calls per task with no
scheduler around them. Optionally (``--big-queue``) farm alone on a large queue of the no-op fake
model: controller CPU per task and memory. Writes bench/results/scheduling-<timestamp>.json (schema in README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORKERS = 2
SYSTEMS = ("farm", "ray_data", "actor_pool")
# Round r runs the systems in ORDERS[r % 6] (indexes into SYSTEMS): a Williams design for three.
ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0), (0, 2, 1), (1, 0, 2))
WORKLOADS = {  # label → (model, size WxHxF)
    "a_sleep_50ms": ("fake:sleep-50ms", "16x16x1"),
    "b_tiny_wan": ("tiny", "64x64x9"),
}


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


def write_manifest(folder: Path, name: str, model: str, count: int, size: str, output: Path | None = None) -> Path:
    w, h, f = size.split("x")
    path = folder / f"{name}.yaml"
    path.write_text(
        f"campaign: {name}\nmodel: '{model}'\nprompt: 'bench'\n"
        f"render: {{width: {w}, height: {h}, frames: {f}, steps: 4}}\n"
        f"seeds: {{count: {count}}}\nretries: 0\n" + (f"output: '{output}'\n" if output else "")
    )
    return path


def timing(tasks: int, makespan: float, busy: float) -> dict:
    return {
        "tasks": tasks,
        "makespan_s": round(makespan, 3),
        "busy_s": round(busy, 3),
        "efficiency": round(busy / WORKERS / makespan, 4),
    }


def from_results(results) -> dict:
    busy = sum(r.timings.generate_s + r.timings.encode_s + r.timings.write_s for r in results)
    makespan = max(r.finished_at for r in results) - min(r.started_at for r in results)
    return timing(len(results), makespan, busy)


def tasks_of(manifest: Path):
    from farm.expand import expand
    from farm.manifest import load_manifest

    mf = load_manifest(manifest)
    return mf, expand(mf).tasks


def ideal_seconds_per_task(manifest: Path, out_dir: Path, sample: int) -> float:
    """One Renderer in this process, no scheduler and no Ray call: wall seconds per task (after
    one warm-up render), on the workers' thread count."""
    from farm.render import Renderer
    from farm.storage import OutputTarget

    mf, tasks = tasks_of(manifest)
    renderer = Renderer(mf.model, None, 1)
    target = OutputTarget(str(out_dir))
    renderer.render(tasks[0], 1, target)
    started = time.perf_counter()
    for task in tasks[1 : sample + 1]:
        renderer.render(task, 1, target)
    return (time.perf_counter() - started) / sample


def run_farm(manifest: Path) -> dict:
    """One job through farm's controller (started fresh on this run's catalog, as a user's first
    submit starts it), with its CPU measured from /proc."""
    import ray

    from farm import api
    from farm.catalog import Catalog
    from farm.controller import get_or_start_controller

    controller = get_or_start_controller(os.environ["FARM_CATALOG"])
    pid = ray.get(controller.ping.remote())["pid"]
    admitted: dict = {}

    def on_progress(_progress) -> None:  # first called as soon as the controller took the job
        admitted.setdefault("cpu_s", proc_stats(pid)["cpu_s"])

    before, driver_before = proc_stats(pid), time.process_time()
    outcome = api.submit(manifest, on_progress=on_progress)
    after, driver_after = proc_stats(pid), time.process_time()
    rows = Catalog(os.environ["FARM_CATALOG"]).attempts(outcome.job_id).to_pylist()
    busy = sum(r["generate_s"] + r["encode_s"] + r["write_s"] for r in rows)
    makespan = (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()
    n = len(rows)
    out = timing(n, makespan, busy)
    admitted_cpu = admitted.get("cpu_s", before["cpu_s"])
    out.update(
        controller_cpu_ms_per_task=round((after["cpu_s"] - before["cpu_s"]) / n * 1000, 3),
        controller_admission_cpu_ms_per_task=round((admitted_cpu - before["cpu_s"]) / n * 1000, 3),
        controller_run_cpu_ms_per_task=round((after["cpu_s"] - admitted_cpu) / n * 1000, 3),
        driver_cpu_ms_per_task=round((driver_after - driver_before) / n * 1000, 3),
        controller_rss_mb=round(after["rss_mb"], 1),
    )
    ray.get(controller.shutdown.remote())
    ray.kill(controller, no_restart=True)
    return out


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
    driver_before = time.process_time()
    results = list(pool.map_unordered(lambda a, t: a.render.remote(t, 1, target), tasks))
    driver_s = time.process_time() - driver_before
    for a in actors:
        ray.kill(a)
    return {**from_results(results), "driver_cpu_ms_per_task": round(driver_s / len(results) * 1000, 3)}


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
    return from_results([result_from_record(json.loads(r["result"])) for r in rows])


def run_once(system: str, folder: Path, name: str, model: str, count: int, size: str) -> dict:
    """One run of one system, into its own output folder (and for farm its own catalog: a second
    run must render again, not find the first one's clips done)."""
    out_dir = folder / f"{name}-out"
    manifest = write_manifest(folder, name, model, count, size, output=out_dir if system == "farm" else None)
    if system == "farm":
        os.environ["FARM_CATALOG"] = str(folder / f"{name}-catalog")
        return run_farm(manifest)
    return run_ray_data(manifest, out_dir) if system == "ray_data" else run_actor_pool(manifest, out_dir)


def medians(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0] if key != "tasks"}


def workload(label: str, count: int, runs: int, folder: Path) -> dict:
    """Every system ``runs`` times, alternating (the order rotates each run); medians and ratios."""
    model, size = WORKLOADS[label]
    sample = min(count - 1, 40 if model.startswith("fake") else 20)
    ideal_task_s = ideal_seconds_per_task(
        write_manifest(folder, f"{label}-ideal", model, sample + 1, size), folder / f"{label}-ideal-out", sample
    )
    ideal_s = ideal_task_s * count / WORKERS
    per_run: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for i in range(runs):
        for system in (SYSTEMS[k] for k in ORDERS[i % len(ORDERS)]):
            result = run_once(system, folder, f"{label}-{system}-{i}".replace("_", "-"), model, count, size)
            result["makespan_vs_ideal"] = round(result["makespan_s"] / ideal_s, 4)
            per_run[system].append(result)
            print(label, system, i, json.dumps(result), flush=True)
    summary = {system: medians(results) for system, results in per_run.items()}
    best_other = min(summary["ray_data"]["makespan_s"], summary["actor_pool"]["makespan_s"])
    paired = paired_ratios(per_run)
    return {
        "tasks": count,
        "ideal_s_per_task": round(ideal_task_s, 5),
        "ideal_makespan_s": round(ideal_s, 3),
        "median": summary,
        "farm_vs_best_other": round(summary["farm"]["makespan_s"] / best_other, 4),
        "paired": paired,
        "farm_vs_best_other_paired": max(paired.values()),
        "runs": per_run,
    }


def paired_ratios(per_run: dict[str, list[dict]]) -> dict[str, float]:
    """For each other system, the median over rounds of farm's makespan ÷ that system's in the same
    round. farm ÷ the best of them is the largest of these (each compared on its own: the smaller
    of two noisy makespans a round would be biased low)."""
    return {
        system: round(
            statistics.median(
                f["makespan_s"] / o["makespan_s"] for f, o in zip(per_run["farm"], per_run[system], strict=True)
            ),
            4,
        )
        for system in SYSTEMS
        if system != "farm"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sleep-tasks", type=int, default=2000, help="tasks of workload (a) (0: skip)")
    parser.add_argument("--tiny-tasks", type=int, default=400, help="tasks of workload (b) (0: skip)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per system and workload")
    parser.add_argument("--big-queue", type=int, default=0, help="tasks of a farm job on the no-op model (0: skip)")
    parser.add_argument("--label", default="", help="what code this run measures (kept in the results)")
    args = parser.parse_args()
    import ray

    results: dict = {
        "benchmark": "scheduling",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
        "workers": WORKERS,
        "runs": args.runs,
        "label": args.label,
    }
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        folder = Path(tmp)
        os.environ["FARM_HOME"] = str(folder / "home")
        # The controllers serve metrics on a free port: never a running farm's 9400, never scraped.
        os.environ["FARM_METRICS_ADDRESS"] = "127.0.0.1:0"
        # A Ray of its own ("local"), never one another process on this machine started.
        ray.init(
            address="local", num_cpus=WORKERS, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
        )
        for label, count in (("a_sleep_50ms", args.sleep_tasks), ("b_tiny_wan", args.tiny_tasks)):
            if count:
                results[label] = workload(label, count, args.runs, folder)
                print(label, json.dumps({k: v for k, v in results[label].items() if k != "runs"}), flush=True)
        if args.big_queue:  # the controller on a large queue: CPU per task and memory
            results["big_queue_noop"] = run_once("farm", folder, "bigqueue", "fake:noop", args.big_queue, "16x16x1")
            print("big_queue_noop", json.dumps(results["big_queue_noop"]), flush=True)
        ray.shutdown()
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scheduling-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
