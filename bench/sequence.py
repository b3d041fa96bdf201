"""Sequences (``sequence:``, farm/sequence/plan.py) as a task graph: what waiting on parents costs.

1. **Graph dispatch latency** — chained sequences of tiny-Wan clips on the embedded local Ray
   (2 renderers, as many chains as renderers so a child never queues behind another chain's
   clip): for every task with parents, the time from its last parent's attempt ``finished_at``
   (the renderer's clock, taken before the commit marker is written) to its own ``started_at``
   (the renderer's clock as it enters ``render``). The controller is started instrumented (a
   subclass in this file, same name and namespace, so ``api.submit`` finds it): it stamps when it
   takes the parent's result (``_collect``) and when it sends the child (``_send``), which splits
   the gap into result return (renderer → controller), controller (result → child sent), and the
   actor call (sent → renderer starts it). The target (issue): median ≤ 50 ms.
2. **Planning time** — a manifest of 1,000 chained sequences × 10 shots (an axis of 100 values ×
   10 seeds): ``load_manifest`` + ``expand`` in one process, ``api.plan`` (also resolves variants,
   asks the empty catalog, routes and sizes pools), and the whole ``farm plan`` CLI process —
   median of 3 each, tasks made, peak resident memory. Target: ≤ 2 s.
3. **Chained vs keyframes** — the same 8-shot sequence on the chained plan (8 segments in a row,
   then the film: depth 9) and the keyframe plan (9 stills, 8 segments at once, the film: depth
   3) on 2 renderers, alternating, 3 runs each, medians. Makespan = last attempt's finished_at −
   first attempt's started_at; ideal = max(critical path, total busy ÷ 2 renderers), where a
   task's busy time is its attempt's finished_at − started_at and the critical path is the
   heaviest parent chain by those times; ratio = makespan ÷ ideal.

Every run gets its own catalog, output folder and freshly started controller (nothing is "already
done"), and its 2 renderers are warmed first (model and its image-to-video sibling loaded, by small
i2v jobs) so the measured job sees no model load. One FARM_HOME serves the whole benchmark (Ray's
workers take the environment of ray.init): a task reads its parents' clips from the run's output,
never from a cache. The tiny models are built once into FARM_MODELS_DIR. Writes
bench/results/sequence-<timestamp>.json (``-quick`` with --quick; --out elsewhere).

    .venv/bin/python bench/sequence.py            # ~4 minutes on 2 shared cores
    .venv/bin/python bench/sequence.py --quick    # ~1.5 minutes: fewer runs, smaller planning manifest
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORKERS = 2
TARGET_LATENCY_MS = 50.0
TARGET_PLAN_S = 2.0


# ----------------------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def dist_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return {"n": 0}
    return {
        "median_ms": round(statistics.median(ms), 2),
        "p90_ms": round(pct(ms, 0.9), 2),
        "max_ms": round(max(ms), 2),
        "min_ms": round(min(ms), 2),
        "n": len(ms),
    }


def sequence_manifest(
    path: Path,
    name: str,
    plan: str,
    shots: int,
    size: str,
    steps: int,
    seeds: int,
    output: Path | None = None,
    axis: int = 0,
) -> Path:
    """A sequence manifest: ``shots`` shots, ``seeds`` seeds (× ``axis`` subjects when given)."""
    w, h, f = size.split("x")
    subject = "{subject} " if axis else ""
    text = (
        f"campaign: {name}\nmodel: tiny\n"
        f"render: {{width: {w}, height: {h}, frames: {f}, steps: {steps}}}\n"
        f"sequence:\n  plan: {plan}\n  crossfade: 1\n  shots:\n"
        + "".join(f"    - prompt: '{subject}shot {i + 1} of the bench sequence'\n" for i in range(shots))
        + f"seeds: {{count: {seeds}}}\nretries: 0\n"
        + (f"axes:\n  subject: [{', '.join(f's{i}' for i in range(axis))}]\n" if axis else "")
        + (f"output: '{output}'\n" if output else "")
    )
    path.write_text(text)
    return path


def timed_controller_class():
    """farm's Controller, stamping on the wall clock (like the renderers' started_at/finished_at):
    when its loop takes each attempt's result (``_collect``) and sends each attempt (``_send``);
    when its loop thread is inside ``ray.wait`` (idle, waiting for a result); and how long it
    spends reading the pools (``_refresh_pools``, every POOL_REFRESH_S), collecting a result and
    dispatching."""
    import threading

    from farm.controller import Controller

    class TimedController(Controller):
        def __init__(self, *args, **kwargs) -> None:
            import ray

            # All set before the loop's thread starts (in Controller.__init__).
            self._stamps: list[tuple[str, str, float, str]] = []  # (kind, task id, when, slot)
            self._spans: list[tuple[str, float, float]] = []  # (what, from, to) of the loop thread
            if not getattr(ray.wait, "bench_timed", False):  # this actor's own process: only it is timed
                untimed, spans = ray.wait, self._spans

                def timed_wait(*a, **k):
                    called = time.time()
                    try:
                        return untimed(*a, **k)
                    finally:
                        if threading.current_thread().name == "farm-dispatch":
                            spans.append(("ray.wait", called, time.time()))

                timed_wait.bench_timed = True  # type: ignore[attr-defined]
                ray.wait = timed_wait
            super().__init__(*args, **kwargs)

        def _timed(self, what: str, fn, *args):
            started = time.time()
            try:
                return fn(*args)
            finally:
                self._spans.append((what, started, time.time()))

        def _send(self, d) -> None:
            self._stamps.append(("sent", d.task.task_id, time.time(), d.slot))
            super()._send(d)

        def _collect(self, ref) -> None:
            entry = self.fleet.in_flight.get(ref)
            if entry is not None:
                self._stamps.append(("collected", entry[1].task.task_id, time.time(), entry[0]))
            self._timed("collect", super()._collect, ref)

        def _refresh_pools(self) -> None:
            self._timed("refresh_pools", super()._refresh_pools)

        def _dispatch(self, now: float) -> bool:
            return self._timed("dispatch", super()._dispatch, now)

        def stamps(self) -> dict:
            return {"stamps": list(self._stamps), "spans": list(self._spans)}

    return TimedController


def run_job(folder: Path, name: str, manifest: Path) -> dict:
    """One job through a freshly started (instrumented) controller on a catalog of its own.
    Returns its tasks, attempt rows and the controller's stamps."""
    import ray

    from farm import api
    from farm.catalog import Catalog
    from farm.controller import CONTROLLER_NAME, HEAD_NODE_RESOURCE, NAMESPACE

    catalog = str(folder / f"{name}-catalog")
    os.environ["FARM_CATALOG"] = catalog
    controller = (
        ray.remote(timed_controller_class())
        .options(
            name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=32,
            num_cpus=0,
            resources={HEAD_NODE_RESOURCE: 0.001},
        )
        .remote(catalog, "127.0.0.1:0")
    )
    ray.get(controller.ping.remote())
    try:
        warm_up(folder, name, controller)
        outcome = api.submit(manifest)
        timed = ray.get(controller.stamps.remote())
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller, no_restart=True)
    rows = Catalog(catalog).attempts(outcome.job_id).to_pylist()
    failed = [r for r in rows if r["status"] != "succeeded"]
    if failed or len(rows) != len(outcome.plan.tasks):
        raise SystemExit(f"{name}: {len(failed)} failed attempts of {len(rows)}: {failed[:1]}")
    output = outcome.output
    return {"job_id": outcome.job_id, "tasks": outcome.plan.tasks, "rows": rows, "output": output, **timed}


def warm_up(folder: Path, name: str, controller) -> None:
    """Both renderers started, their model loaded and its image-to-video sibling too (loaded on a
    renderer's first image-mode task: extend, flf2v) before the measured job — renderers stay
    resident across jobs. Small image-to-video jobs until each renderer has rendered one."""
    import ray

    from farm import api
    from farm.catalog import Catalog

    image = REPO / "manifests" / "inputs" / "keyframes" / "open.png"
    catalog = Catalog(os.environ["FARM_CATALOG"])
    deadline = time.monotonic() + 120
    warmed: set[str] = set()  # renderers (actor ids) that have rendered an image-to-video clip
    for round_ in range(8):
        path = folder / f"{name}-warmup-{round_}.yaml"
        path.write_text(
            f"campaign: {name}-warmup\nmodel: tiny\nmode: i2v\nimage: '{image}'\nprompt: 'warm up'\n"
            f"render: {{width: 32, height: 32, frames: 5, steps: 2}}\n"
            f"seeds: {{base: {100 * round_}, count: {4 * WORKERS}}}\noutput: '{folder / f'{name}-warmup-out'}'\n"
        )
        outcome = api.submit(path)
        warmed |= {r["actor_id"] for r in catalog.attempts(outcome.job_id, columns=["actor_id"]).to_pylist()}
        while True:
            stats = ray.get(controller.renderer_stats.remote())
            if (len(stats) >= WORKERS and all(r["ready"] for r in stats)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(stats) >= WORKERS and all(r["actor_id"] in warmed for r in stats):
            return
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"{name}: {WORKERS} renderers not warmed up after {round_ + 1} warm-up jobs")


def ts(value) -> float:
    return value.timestamp()


# ----------------------------------------------------------------------------- 1. dispatch latency


def overlap(spans: list[tuple[str, float, float]], what: str, start: float, end: float) -> float:
    """Seconds of [start, end] inside the loop thread's spans named ``what``."""
    return sum(max(0.0, min(end, b) - max(start, a)) for w, a, b in spans if w == what)


def edges(job: dict) -> list[dict]:
    """Per task with parents: its last parent and the gaps from that parent's end to its start."""
    rows = {r["task_id"]: r for r in job["rows"]}
    sent = {t: at for kind, t, at, _ in job["stamps"] if kind == "sent"}
    slot = {t: s for kind, t, _, s in job["stamps"] if kind == "sent"}
    collected = {t: at for kind, t, at, _ in job["stamps"] if kind == "collected"}
    spans = job["spans"]
    marker = {}
    for t in rows:
        st = os.stat(Path(job["output"]) / f"{t}.json")
        marker[t] = (st.st_mtime_ns / 1e9, st.st_ctime_ns / 1e9)
    out = []
    for task in job["tasks"]:
        if not task.parents:
            continue
        parent = max(task.parents, key=lambda p: ts(rows[p]["finished_at"]))
        parent_end, child_start = ts(rows[parent]["finished_at"]), ts(rows[task.task_id]["started_at"])
        took = collected[parent]
        waiting = overlap(spans, "ray.wait", parent_end, took)
        edge = {
            "kind": "film" if task.mode.value == "stitch" else "segment",
            "total_s": child_start - parent_end,
            "parent_finished_to_sent_s": sent[task.task_id] - parent_end,
            "result_return_s": took - parent_end,
            # of result_return: the loop thread inside ray.wait (the result on its way: commit
            # marker written, Result serialised and sent, the wait woken) or busy elsewhere
            "return_in_wait_s": waiting,
            "return_loop_busy_s": (took - parent_end) - waiting,
            "return_busy_refresh_pools_s": overlap(spans, "refresh_pools", parent_end, took),
            "return_busy_collect_s": overlap(spans, "collect", parent_end, took),
            # the parent's commit marker as the file system stamped it: written (mtime, before its
            # fsync) and renamed into place (ctime): the renderer's last step before returning
            "marker_written_s": marker[parent][0] - parent_end,
            "marker_renamed_s": marker[parent][1] - parent_end,
            "marker_to_collected_s": took - marker[parent][1],
            "controller_s": sent[task.task_id] - took,
            "actor_call_s": child_start - sent[task.task_id],
            # the child's renderer was still on another clip when the child was sent to it
            "renderer_busy": any(
                slot[other] == slot[task.task_id]
                and ts(rows[other]["started_at"]) < sent[task.task_id] < ts(rows[other]["finished_at"])
                for other in rows
                if other != task.task_id
            ),
            "same_renderer_as_parent": slot[parent] == slot[task.task_id],
        }
        out.append(edge)
    return out


def loop_spans(job: dict) -> dict:
    """How long the controller's loop spent on each kind of work during the measured job."""
    first = min(ts(r["started_at"]) for r in job["rows"])
    last = max(ts(r["finished_at"]) for r in job["rows"])
    out: dict = {}
    for what in ("refresh_pools", "collect", "dispatch"):
        durations = [b - a for w, a, b in job["spans"] if w == what and first <= a <= last]
        if durations:
            out[what] = {
                "n": len(durations),
                "median_ms": round(statistics.median(durations) * 1000, 2),
                "max_ms": round(max(durations) * 1000, 2),
            }
    return out


def dispatch_latency(folder: Path, runs: int, shots: int, size: str, steps: int) -> dict:
    chains = WORKERS  # one chain per renderer: a child never waits behind another chain's clip
    samples: list[dict] = []
    per_run = []
    for i in range(runs):
        name = f"latency-{i}"
        manifest = sequence_manifest(
            folder / f"{name}.yaml", name, "chained", shots, size, steps, chains, output=folder / f"{name}-out"
        )
        started = time.perf_counter()
        job = run_job(folder, name, manifest)
        run_edges = edges(job)
        samples += run_edges
        per_run.append(
            {
                "wall_s": round(time.perf_counter() - started, 2),
                "tasks": len(job["tasks"]),
                "median_ms": round(statistics.median(e["total_s"] for e in run_edges) * 1000, 2),
                "max_ms": round(max(e["total_s"] for e in run_edges) * 1000, 2),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
                "controller_loop": loop_spans(job),
            }
        )
        print(f"latency run {i}: {per_run[-1]}", flush=True)

    def of(key: str, kind: str | None = None) -> dict:
        return dist_ms([e[key] for e in samples if kind is None or e["kind"] == kind])

    total = of("total_s")
    return {
        "measures": (
            "per task with parents: its started_at (the renderer entering render(), before its inputs are read) "
            "minus its last parent's attempt finished_at (the renderer, before the commit marker is written); "
            "the parts are split at the controller's own wall-clock stamps: result_return = parent finished_at → "
            "controller takes the result (_collect), controller = that → child sent (_send), actor_call = sent → "
            "child started_at; result_return is split into return_in_wait (the loop thread inside ray.wait: the "
            "commit marker written, the Result sent back, the wait woken) and return_loop_busy (the loop thread "
            "doing something else meanwhile; of which refresh_pools / collect of another result); marker_written / "
            "marker_renamed: the parent's commit marker's mtime (written, before fsync) and ctime (renamed into "
            "place) after its finished_at, marker_to_collected: from that rename to the controller taking the "
            "result (Ray's return path; file times are the kernel's, to its timestamp granularity). Renderers are "
            "warm (model and image-to-video model loaded) before each run. All clocks are this machine's "
            "time.time(); the catalog's started_at/finished_at are stored in whole milliseconds (truncated), so "
            "totals are whole ms and each part is off by up to 1 ms."
        ),
        "setup": {
            "workers": WORKERS,
            "chains_per_run": chains,
            "shots": shots,
            "size": size,
            "steps": steps,
            "runs": runs,
        },
        "total": total,
        "total_segments": of("total_s", "segment"),
        "total_films": of("total_s", "film"),
        "parent_finished_to_sent": of("parent_finished_to_sent_s"),
        "result_return": of("result_return_s"),
        "return_in_wait": of("return_in_wait_s"),
        "return_loop_busy": of("return_loop_busy_s"),
        "return_busy_refresh_pools": of("return_busy_refresh_pools_s"),
        "marker_written": of("marker_written_s"),
        "marker_renamed": of("marker_renamed_s"),
        "marker_to_collected": of("marker_to_collected_s"),
        "controller": of("controller_s"),
        "actor_call": of("actor_call_s"),
        "renderer_busy_edges": sum(e["renderer_busy"] for e in samples),
        "same_renderer_as_parent_edges": sum(e["same_renderer_as_parent"] for e in samples),
        "target_median_ms": TARGET_LATENCY_MS,
        "meets_target": total["median_ms"] <= TARGET_LATENCY_MS,
        "runs": per_run,
        "edges_ms": [{k: (round(v * 1000, 2) if isinstance(v, float) else v) for k, v in e.items()} for e in samples],
    }


# ----------------------------------------------------------------------------- 2. planning

PLAN_CHILD = r"""
import json, resource, statistics, sys, time
from pathlib import Path
path, repeat, out_dir = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
from farm import api
from farm.expand import expand
from farm.manifest import load_manifest
imports = time.perf_counter() - t0
load_s, expand_s, both_s, plan_s, tasks, expanded = [], [], [], [], 0, 0
for _ in range(repeat):
    a = time.perf_counter(); mf = load_manifest(path); b = time.perf_counter(); e = expand(mf); c = time.perf_counter()
    load_s.append(b - a); expand_s.append(c - b); both_s.append(c - a); tasks, expanded = len(e.tasks), e.expanded
    del mf, e
for _ in range(repeat):
    a = time.perf_counter(); p = api.plan(path); plan_s.append(time.perf_counter() - a)
    assert len(p.tasks) == tasks and len(p.to_render) == tasks, (len(p.tasks), tasks)
    del p
print(json.dumps({"imports_s": imports, "load_s": load_s, "expand_s": expand_s, "load_expand_s": both_s,
                  "api_plan_s": plan_s, "tasks": tasks, "expanded": expanded,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cli_run(args: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak MB) of one whole ``farm`` process (as bench/frontend.py measures it)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"farm {' '.join(args)} failed: {stderr.strip()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def planning(folder: Path, subjects: int, seeds: int, shots: int, repeat: int) -> dict:
    manifest = sequence_manifest(
        folder / "plan.yaml",
        "planbench",
        "chained",
        shots,
        "64x64x9",
        4,
        seeds,
        output=folder / "plan-out",
        axis=subjects,
    )
    env = {**os.environ, "FARM_METRICS_ADDRESS": "off"}
    env.pop("FARM_CATALOG", None)
    child = subprocess.run(
        [sys.executable, "-c", PLAN_CHILD, str(manifest), str(repeat), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode:
        raise SystemExit(f"planning child failed: {child.stderr[-2000:]}")
    inproc = json.loads(child.stdout.strip().splitlines()[-1])
    med = {k: round(statistics.median(inproc[k]), 3) for k in ("load_s", "expand_s", "load_expand_s", "api_plan_s")}
    cli: dict = {}
    for label, extra in (("plan_show0", ["--show", "0"]), ("plan_default", [])):
        runs = [cli_run(["plan", str(manifest), *extra], env) for _ in range(repeat)]
        cli[label] = {
            "args": ["farm", "plan", "<manifest>", *extra],
            "seconds": round(statistics.median(r[0] for r in runs), 3),
            "peak_mb": round(max(r[1] for r in runs), 1),
            "runs": [round(r[0], 3) for r in runs],
        }
    return {
        "manifest": {
            "sequences": subjects * seeds,
            "subjects": subjects,
            "seeds": seeds,
            "shots": shots,
            "plan": "chained",
        },
        "tasks": inproc["tasks"],
        "expanded": inproc["expanded"],
        "repeat": repeat,
        "in_process": {
            **{f"{k}_median": v for k, v in med.items()},
            "runs": {k: [round(x, 3) for x in inproc[k]] for k in ("load_expand_s", "api_plan_s")},
            "imports_s": round(inproc["imports_s"], 3),
            "peak_mb": round(inproc["peak_mb"], 1),
        },
        "cli": cli,
        "target_s": TARGET_PLAN_S,
        "meets_target": {
            "load_expand": med["load_expand_s"] <= TARGET_PLAN_S,
            "api_plan": med["api_plan_s"] <= TARGET_PLAN_S,
            "cli_plan_show0": cli["plan_show0"]["seconds"] <= TARGET_PLAN_S,
            "cli_plan_default": cli["plan_default"]["seconds"] <= TARGET_PLAN_S,
        },
    }


# ----------------------------------------------------------------------------- 3. chained vs keyframes


def makespan_figures(job: dict) -> dict:
    rows = {r["task_id"]: r for r in job["rows"]}
    busy = {t: ts(r["finished_at"]) - ts(r["started_at"]) for t, r in rows.items()}
    start = min(ts(r["started_at"]) for r in rows.values())
    end = max(ts(r["finished_at"]) for r in rows.values())
    by_id = {t.task_id: t for t in job["tasks"]}
    path: dict[str, float] = {}

    def heaviest(task_id: str) -> float:  # graphs here are ≤ 20 tasks deep: recursion is fine
        if task_id not in path:
            parents = [p for p in by_id[task_id].parents if p in by_id]
            path[task_id] = busy[task_id] + max((heaviest(p) for p in parents), default=0.0)
        return path[task_id]

    critical = max(heaviest(t) for t in by_id)
    total = sum(busy.values())
    ideal = max(critical, total / WORKERS)
    makespan = end - start
    parts: dict[str, list[float]] = {}
    for t in job["tasks"]:
        parts.setdefault(dict(t.variant).get("part", "?"), []).append(busy[t.task_id])
    return {
        "tasks": len(rows),
        "makespan_s": round(makespan, 3),
        "critical_path_s": round(critical, 3),
        "total_busy_s": round(total, 3),
        "ideal_s": round(ideal, 3),
        "makespan_vs_ideal": round(makespan / ideal, 4),
        "busy_s_by_part": {k: {"n": len(v), "median_s": round(statistics.median(v), 3)} for k, v in parts.items()},
    }


def chained_vs_keyframes(folder: Path, runs: int, shots: int, size: str, steps: int) -> dict:
    per_plan: dict[str, list[dict]] = {"chained": [], "keyframes": []}
    for i in range(runs):
        for plan in ("chained", "keyframes") if i % 2 == 0 else ("keyframes", "chained"):
            name = f"{plan}-{i}"
            manifest = sequence_manifest(
                folder / f"{name}.yaml", name, plan, shots, size, steps, 1, output=folder / f"{name}-out"
            )
            figures = makespan_figures(run_job(folder, name, manifest))
            per_plan[plan].append(figures)
            print(
                f"{plan} run {i}: {json.dumps({k: v for k, v in figures.items() if k != 'busy_s_by_part'})}", flush=True
            )
    keys = ("makespan_s", "critical_path_s", "total_busy_s", "ideal_s", "makespan_vs_ideal")
    median = {p: {k: round(statistics.median(r[k] for r in rs), 4) for k in keys} for p, rs in per_plan.items()}
    return {
        "setup": {
            "workers": WORKERS,
            "shots": shots,
            "size": size,
            "steps": steps,
            "runs": runs,
            "order": "alternating",
        },
        "ideal": "max(critical path, total busy / workers); busy = attempt finished_at - started_at",
        "median": median,
        "keyframes_vs_chained_makespan": round(median["keyframes"]["makespan_s"] / median["chained"]["makespan_s"], 4),
        "runs": per_plan,
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and a 100-sequence planning manifest")
    parser.add_argument("--only", choices=("latency", "planning", "makespan"), action="append", help="run only these")
    parser.add_argument("--label", default="", help="what code this run measures (kept in the results)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default bench/results)")
    args = parser.parse_args()
    only = set(args.only or ("latency", "planning", "makespan"))
    quick = args.quick
    import ray

    results: dict = {
        "benchmark": "sequence",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
        "python": platform.python_version(),
        "ray": ray.__version__,
        "quick": quick,
        "label": args.label,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="farm-bench-seq-") as tmp:
        folder = Path(tmp)
        os.environ["FARM_HOME"] = str(folder / "home")
        os.environ.setdefault("FARM_MODELS_DIR", str(folder / "models"))
        os.environ["FARM_METRICS_ADDRESS"] = "127.0.0.1:0"
        if "planning" in only:
            results["planning"] = planning(folder, 10 if quick else 100, 10, 10, 1 if quick else 3)
            p = results["planning"]
            print(
                f"planning {p['tasks']} tasks: load+expand {p['in_process']['load_expand_s_median']} s, "
                f"api.plan {p['in_process']['api_plan_s_median']} s, farm plan --show 0 "
                f"{p['cli']['plan_show0']['seconds']} s, farm plan {p['cli']['plan_default']['seconds']} s",
                flush=True,
            )
        if only & {"latency", "makespan"}:
            from farm.config import models_dir
            from farm.models.tiny import ensure_tiny_i2v_model, ensure_tiny_model

            ensure_tiny_model(models_dir())  # once, before any renderer wants them
            ensure_tiny_i2v_model(models_dir())
            ray.init(
                address="local",
                num_cpus=WORKERS,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
            try:
                if "latency" in only:
                    results["dispatch_latency"] = dispatch_latency(folder, 1 if quick else 3, 10, "32x32x5", 2)
                    d = results["dispatch_latency"]["total"]
                    print(f"dispatch latency: {json.dumps(d)}", flush=True)
                if "makespan" in only:
                    results["chained_vs_keyframes"] = chained_vs_keyframes(folder, 1 if quick else 3, 8, "64x64x9", 4)
                    print(f"makespans: {json.dumps(results['chained_vs_keyframes']['median'])}", flush=True)
            finally:
                ray.shutdown()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sequence-{datetime.now(UTC):%Y%m%d-%H%M%S}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
