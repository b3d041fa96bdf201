"""bench/gpu.py at toy size on the CPU: every variant runs through farm's own loading code, the
results file appears under its name with the schema bench/README.md states, long runs are
marked extrapolated, and the pipeline measurement writes the same bytes both ways."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from tests.toywan import toy_wan_dir

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_at_toy_size_on_the_cpu_and_writes_its_results_as_it_goes(tmp_path):
    bench = load_bench()
    args = ["--toy", "--cpu", "--model-dir", str(toy_wan_dir()), "--out", str(tmp_path), "--steps", "2"]
    path = bench.main([*args, "--clips", "2", "--compile-backend", "eager", "--deadline-s", "300"])
    assert re.fullmatch(r"gpu-cpu-[a-z0-9-]+-\d{8}-\d{6}\.json", path.name) and path.parent == tmp_path
    data = json.loads(path.read_text())
    assert data["schema"] == "farm-bench-gpu/1" and data["complete"] and data["toy"]
    assert data["device"]["kind"] == "cpu" and data["model"]["gguf_bytes"].keys() == {"Q8_0", "Q4_0"}
    runs = {(r["variant"], r["size"]): r for r in data["runs"]}
    assert set(runs) == {(v[0], s) for v in bench.VARIANTS for s in ("48x32x9", "32x32x5")}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["extrapolated"] and run["steps_measured"] == 2 and run["steps_default"] == 50
        assert run["s_per_clip"] > 0 and run["step_s"] > 0 and run["peak_vram_gb"] is None
    assert runs["q4", "48x32x9"]["run_variant"] == "q4 Q4_0-gguf compute=float32 cpu"
    assert (
        runs["bf16+compile", "48x32x9"]["compile_s"] > 0
        and "compiled=eager" in runs["bf16+compile", "48x32x9"]["run_variant"]
    )
    assert runs["bf16+cache", "48x32x9"]["run_variant"].endswith("cache=first-block")
    pipeline = data["pipeline"]
    assert pipeline["same_bytes"] and pipeline["clips"] == 2
    assert 0 < pipeline["serial"]["generate_share"] <= 1 and 0 < pipeline["pipelined"]["generate_share"] <= 1
    assert data["seed_claim"]["seconds"] == [30, 45]
