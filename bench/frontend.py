"""The front end, as a user meets it from the CLI: how long `farm validate` and `farm plan` take
and how much memory they peak at on 100,000 and 1,000,000 tasks, how long a hostile manifest
takes to be refused, and how long re-submitting a finished job takes (the demo, and a finished
10,000-task job), next to `farm validate` on the same manifest.

Every figure is a whole `farm` process, start-up included, timed from outside; peak memory is the
process's own maximum resident set (``os.wait4``). Each command runs ``--repeat`` times; the
median is reported. Results: ``bench/results/frontend-<timestamp>.json``.

    .venv/bin/python bench/frontend.py              # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FARM = [sys.executable, "-m", "farm.cli"]


def run(args: list[str], env: dict[str, str], check: bool = True) -> tuple[float, float, int]:
    """(seconds, peak MB, exit code) of one farm command."""
    started = time.perf_counter()
    proc = subprocess.Popen([*FARM, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read() if proc.stderr else ""
    if check and code not in (0,):
        raise SystemExit(f"farm {' '.join(args)} exited {code}: {stderr.strip()[-500:]}")
    return seconds, usage.ru_maxrss / 1024, code


def timed(args: list[str], env: dict[str, str], repeat: int, check: bool = True) -> dict:
    runs = [run(args, env, check) for _ in range(repeat)]
    return {
        "seconds": round(statistics.median(r[0] for r in runs), 3),
        "peak_mb": round(max(r[1] for r in runs), 1),
        "exit": runs[-1][2],
        "runs": [round(r[0], 3) for r in runs],
    }


def matrix(path: Path, name: str, sizes: tuple[int, int, int], seeds: int, model: str = "tiny") -> Path:
    a, b, c = sizes
    path.write_text(
        f'campaign: {name}\nmodel: "{model}"\n'
        'prompt: "{product} for {audience} in {language}, on-screen text \\"buy now\\""\n'
        f"seeds: {{count: {seeds}}}\naxes:\n"
        + "".join(
            f"  {axis}: [" + ",".join(f"{axis}-{i}" for i in range(n)) + "]\n"
            for axis, n in (("product", a), ("audience", b), ("language", c))
        )
    )
    return path


def hostile(folder: Path) -> dict[str, Path]:
    laughs = 'campaign: x\nprompt: "{a}"\na0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 10):
        laughs += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    files = {
        "billion_laughs_1kb": laughs + "axes:\n  a: *a9\n",
        "nesting_5000": "campaign: x\nprompt: hi\nrender: " + "[" * 5000 + "]" * 5000 + "\n",
        "axes_10e12": 'campaign: x\nprompt: "{a} {b} {c} {d}"\nseeds: {count: 100}\naxes:\n'
        + "".join(f"  {n}: [" + ",".join(str(i) for i in range(1000)) + "]\n" for n in "abcd"),
        "file_11mb": "campaign: x\nprompt: hi\n# " + "x" * (11 * 2**20) + "\n",
    }
    out = {}
    for name, text in files.items():
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-plan-1m", action="store_true", help="plan at 1M tasks builds every task: slow")
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="farm-bench-frontend-"))
    env = {**os.environ, "FARM_HOME": str(tmp / "home"), "FARM_METRICS_ADDRESS": "off"}
    results: dict = {"cpus": os.cpu_count(), "repeat": opts.repeat, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        scale = {}
        for label, sizes, seeds in (("100k", (100, 100, 10), 1), ("1m", (100, 100, 10), 10)):
            path = matrix(tmp / f"m{label}.yaml", f"m{label}", sizes, seeds)
            scale[f"validate_{label}"] = timed(["validate", str(path)], env, opts.repeat)
            if label != "1m" or not opts.skip_plan_1m:
                scale[f"plan_{label}"] = timed(["plan", str(path), "--show", "0"], env, 1)
            print(label, scale, flush=True)
        results["front_end"] = scale
        results["hostile"] = {
            name: timed(["validate", str(path)], env, opts.repeat, check=False) for name, path in hostile(tmp).items()
        }
        print(results["hostile"], flush=True)
        demo = REPO / "manifests" / "demo.yaml"
        run(["submit", str(demo), "--workers", "2"], env)  # the first submit renders the 24 clips
        results["resubmit_demo"] = {
            "resubmit": timed(["submit", str(demo)], env, opts.repeat),
            "validate": timed(["validate", str(demo)], env, opts.repeat),
        }
        print(results["resubmit_demo"], flush=True)
        big = matrix(tmp / "m10k.yaml", "m10k", (100, 100, 1), 1, model="fake:noop")
        first = time.perf_counter()
        run(["submit", str(big), "--workers", "2"], env)
        results["resubmit_10k"] = {
            "first_submit_s": round(time.perf_counter() - first, 1),
            "resubmit": timed(["submit", str(big)], env, opts.repeat),
            "validate": timed(["validate", str(big)], env, opts.repeat),
        }
        print(results["resubmit_10k"], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = REPO / "bench" / "results" / f"frontend-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
