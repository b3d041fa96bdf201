"""Throughput of a job of N tasks of the embedded tiny model on the local Ray.

Writes bench/results/throughput-<timestamp>.json with:
  clips_per_minute        succeeded clips / the job's dispatch-to-last-result time
  clips_per_minute_total  the same over the whole submit (Ray start and model loads included)
  model_loads / renderers pipeline loads across renderer processes (must be equal)
  render_share            sum of render time (generate + encode + write) / (renderers × makespan)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--workers", type=int, default=None, help="renderers (default: one per core)")
    parser.add_argument("--size", default="64x64x9", help="WIDTHxHEIGHTxFRAMES of each clip")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    width, height, frames = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        os.environ["FARM_HOME"] = tmp
        from farm import api

        manifest = Path(tmp) / "bench.yaml"
        manifest.write_text(
            "campaign: bench\nprompt: 'benchmark clip'\n"
            f"render: {{width: {width}, height: {height}, frames: {frames}, steps: {args.steps}}}\n"
            f"seeds: {{count: {args.tasks}}}\nretries: 0\n"
        )
        started = time.perf_counter()
        outcome = api.submit(manifest, workers=args.workers)
        total_s = time.perf_counter() - started
    run = outcome.run
    ready = [r for r in outcome.renderers if r["ready"]]
    renderers = len(ready)
    result = {
        "benchmark": "throughput",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "tasks": args.tasks,
        "clip": {"width": width, "height": height, "frames": frames, "steps": args.steps},
        "renderers": renderers,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "makespan_s": round(run.elapsed_s, 3),
        "total_s": round(total_s, 3),
        "startup_s": round(total_s - run.elapsed_s, 3),
        "clips_per_minute": round(run.succeeded / run.elapsed_s * 60, 1),
        "clips_per_minute_total": round(run.succeeded / total_s * 60, 1),
        "model_loads": sum(r["loads"] for r in ready),
        "model_load_s": [round(r["load_s"], 2) for r in ready],
        "render_share": round(run.busy_s / (renderers * run.elapsed_s), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"throughput-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    ok = result["model_loads"] == renderers and run.failed == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
