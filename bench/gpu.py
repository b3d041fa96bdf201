"""GPU benchmark: a full-size Wan 2.1 1.3B (random weights) run the way farm's renderer runs it.

For 832x480x81 and 512x512x65 (and, with --toy, two toy sizes) it reports, per variant (bf16,
bf16 + compile, bf16 + first-block cache, q8, q4): seconds per clip at the model's default steps,
peak VRAM, load and compile time; then the generate share of a few short clips with the
encode/upload pipeline off and on. Long runs are timed over a few steps and extrapolated (marked
``extrapolated``). Results are written after every run to
``bench/results/gpu-<device slug>-<YYYYmmdd-HHMMSS>.json`` (schema: bench/README.md), so a run
cut short by its deadline still leaves everything it measured.

Standalone: no Ray. Needs torch, diffusers, transformers, accelerate and gguf (and what those
pull in: numpy, Pillow, safetensors, tokenizers); PyAV, where installed, encodes the pipeline
measurement's clips as farm does (else Pillow writes PNG frames). It imports farm's model code
from this checkout (farm/models/, farm/pipelining.py), which needs nothing more.

    python bench/gpu.py                               # one GPU: builds the model first if absent
    python bench/gpu.py --toy --out /tmp/r --compile-backend eager   # CPU, toy size (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import inspect
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # farm's model code, measured exactly as the renderer runs it

SCHEMA = "farm-bench-gpu/1"
SIZES = {"full": [(832, 480, 81), (512, 512, 65)], "toy": [(48, 32, 9), (32, 32, 5)]}
# (name, precision, compile, cache): in the order they run; the deadline cuts from the end.
VARIANTS = [
    ("bf16", "bf16", False, "none"),
    ("bf16+cache", "bf16", False, "first-block"),
    ("q8", "q8", False, "none"),
    ("q4", "q4", False, "none"),
    ("bf16+compile", "bf16", True, "none"),
]
SEED_CLAIM = {"size": "512x512x65", "gpu_class_gb": 24, "seconds": [30, 45]}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Results:
    """The results file, rewritten whole (atomically) after every change."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"schema": SCHEMA, **head, "runs": [], "pipeline": None, "complete": False}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(temp, self.path)


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"kind": device, "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            vram_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=f"cpu-{platform.machine()}", vram_gb=None, threads=torch.get_num_threads())
    for package in ("diffusers", "transformers", "accelerate", "gguf", "av"):
        with contextlib.suppress(Exception):
            info[package] = importlib.metadata.version(package)
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    return info


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def timed_clip(
    loaded: Any, size: tuple[int, int, int], steps: int, device: str, seed: int = 0, latent: bool = False
) -> dict[str, Any]:
    """One clip of ``steps`` steps, with a timestamp after each step: text encoding (before the
    first step), per-step time (median of the steps after the first), decoding (after the last;
    none with ``latent``: a warm-up)."""
    import torch

    width, height, frames = size
    ends: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        _sync(device)
        ends.append(time.perf_counter())
        return kwargs

    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.pipeline(
            prompt="a red fox running through fresh snow, golden hour",
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="latent" if latent else "np",
            callback_on_step_end=on_step,
        )
    _sync(device)
    end = time.perf_counter()
    diffs = sorted(b - a for a, b in itertools.pairwise(ends)) or [ends[0] - start]
    step_s = diffs[len(diffs) // 2]
    return {
        "frames": out.frames[0],
        "wall_s": end - start,
        "text_s": max(0.0, ends[0] - start - step_s),
        "step_s": step_s,
        "decode_s": end - ends[-1],
    }


def measure(loaded: Any, size: tuple[int, int, int], steps: int, default_steps: int, device: str) -> dict[str, Any]:
    """Seconds per clip at ``default_steps``, timed over ``steps`` and extrapolated, after one
    step at this size (kernels chosen, a compiled variant's graph made for this shape)."""
    t0 = time.perf_counter()
    timed_clip(loaded, size, 1, device, latent=True)
    warm_s = time.perf_counter() - t0
    _reset_peak(device)
    clip = timed_clip(loaded, size, steps, device)
    s_per_clip = clip["text_s"] + default_steps * clip["step_s"] + clip["decode_s"]
    return {
        "warm_s": round(warm_s, 3),
        "steps_default": default_steps,
        "steps_measured": steps,
        "extrapolated": steps < default_steps,
        "measured_wall_s": round(clip["wall_s"], 3),
        "text_s": round(clip["text_s"], 3),
        "step_s": round(clip["step_s"], 4),
        "decode_s": round(clip["decode_s"], 3),
        "s_per_clip": round(s_per_clip, 2),
        "peak_vram_gb": _peak_gb(device),
    }


def load_variant(model: Any, precision: str, compile_: bool, backend: str, size: Any, device: str) -> tuple[Any, dict]:
    """Load as farm's renderer does (farm/models/loading.py); compile and warm when asked."""
    from farm.models.loading import compile_transformer, free_device_memory, load_base, prepare

    free_device_memory()
    t0 = time.perf_counter()
    loaded = prepare(model, precision, device, load_base(model, device))
    _sync(device)
    timing: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2), "compile_s": None}
    if compile_:
        t1 = time.perf_counter()
        compile_transformer(loaded, backend)
        timed_clip(loaded, size, 1, device, latent=True)  # the first call compiles: load time in farm
        timing["compile_s"] = round(time.perf_counter() - t1, 2)
    return loaded, timing


def encoder() -> tuple[str, Callable[[Any, Path], str]]:
    """How the pipeline measurement finishes a clip (encode, write, fsync): as farm does (PyAV,
    H.264), else PNG frames with Pillow. Returns the name and a function giving the bytes' sha256."""
    try:
        import av  # noqa: F401

        from farm.video import encode_mp4

        def mp4(frames: Any, path: Path) -> str:
            encode_mp4(frames, 16, path.with_suffix(".mp4"))
            return _synced_sha(path.with_suffix(".mp4").read_bytes(), path.with_suffix(".mp4"))

        return "pyav-libx264", mp4
    except ImportError:
        import io

        from PIL import Image

        def png(frames: Any, path: Path) -> str:
            blob = io.BytesIO()
            for frame in frames:
                Image.fromarray(frame).save(blob, format="PNG")
            path.write_bytes(blob.getvalue())
            return _synced_sha(blob.getvalue(), path)

        return "pillow-png", png


def _synced_sha(data: bytes, path: Path) -> str:
    with path.open("rb+") as fh:  # as a sink does before the commit marker: the bytes are on disk
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def pipeline_share(loaded: Any, size: tuple[int, int, int], steps: int, clips: int, device: str) -> dict[str, Any]:
    """The generate share of ``clips`` short clips, one at a time (depth 1) and with the next one
    generating while the last is finished (depth 2), through farm's own ClipFlow; and whether
    both wrote the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from farm.pipelining import ClipFlow
    from farm.video import to_uint8

    name, finish = encoder()
    out: dict[str, Any] = {"size": "x".join(map(str, size)), "steps": steps, "clips": clips, "encoder": name}
    digests: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="farm-bench-pipeline-") as tmp:
        for depth in (1, 2):
            flow, shas = ClipFlow(), [""] * clips

            def one(i: int, flow: ClipFlow = flow, shas: list[str] = shas, depth: int = depth) -> None:
                with flow.in_hand():
                    with flow.generating() as ticket:
                        t0 = time.perf_counter()
                        frames = to_uint8(timed_clip(loaded, size, steps, device, seed=i)["frames"])
                        flow.generated(time.perf_counter() - t0)
                    with flow.finishing(ticket):
                        shas[i] = finish(frames, Path(tmp) / f"d{depth}-{i}")

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=depth) as pool:
                list(pool.map(one, range(clips)))
            u = flow.utilisation()
            out["serial" if depth == 1 else "pipelined"] = {
                "generate_share": round(u.generate_share, 3),
                "generate_s": round(u.generate_s, 2),
                "wall_s": round(time.perf_counter() - started, 2),
            }
            digests[depth] = shas
    out["same_bytes"] = digests[1] == digests[2]
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="where the random-weight model is built (or found)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--deadline-s", type=float, default=540.0, help="stop starting runs after this (whole run < 10 min)"
    )
    ap.add_argument("--steps", type=int, default=4, help="denoising steps timed per run (then extrapolated)")
    ap.add_argument("--clips", type=int, default=3, help="clips per pipeline-share measurement")
    ap.add_argument("--pipeline-steps", type=int, default=2, help="steps of each pipeline-share clip")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--toy", action="store_true", help="toy-size model and clips (a CPU test)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    deadline = Deadline(args.deadline_s)
    import torch
    from diffusers import WanPipeline

    from farm.models import resolve_model
    from farm.models.benchwan import build_bench_wan

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    info = device_info(device)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = Results(
        args.out / f"gpu-{info['slug']}-{stamp}.json",
        {"started_at": datetime.now(UTC).isoformat(), "deadline_s": args.deadline_s, "device": info, "toy": args.toy},
    )
    watchdog = _watchdog(results, args.deadline_s + 45.0)
    try:
        size_name = "toy" if args.toy else "1.3b"
        model_dir = args.model_dir or Path.home() / "farm-bench" / f"wan2.1-{size_name}-random"
        results.data["model"] = {"dir": str(model_dir), **build_bench_wan(model_dir, size_name, device=device)}
        results.write()
        model = resolve_model(str(model_dir), Path("."))
        default_steps = inspect.signature(WanPipeline.__call__).parameters["num_inference_steps"].default
        run_all(args, results, deadline, model, device, int(default_steps))
    finally:
        watchdog.cancel()
    results.data.update(complete=True, finished_at=datetime.now(UTC).isoformat(), seed_claim=_seed_claim(results))
    results.write()
    _print_summary(results)
    return results.path


def run_all(
    args: argparse.Namespace, results: Results, deadline: Deadline, model: Any, device: str, default_steps: int
) -> None:
    """Each variant at each size, loading a variant once for its runs; the pipeline share after bf16."""
    from farm.models.loading import release, set_cache, set_tiling
    from farm.task import RenderSettings

    loaded, held, last_wall = None, None, {}
    sizes = SIZES["toy" if args.toy else "full"]
    for name, precision, compile_, cache in VARIANTS:
        timing: dict[str, Any] = {}
        for size in sizes:
            run: dict[str, Any] = {"variant": name, "precision": precision, "compile": compile_, "cache": cache}
            run["size"] = "x".join(map(str, size))
            need = 2 * last_wall.get(size, 0.0) + (0.0 if held == (precision, compile_) else 30.0 * (not args.toy))
            if deadline.left() < need:
                results.data["runs"].append(
                    {**run, "status": "skipped", "error": f"deadline: {deadline.left():.0f}s left"}
                )
                results.write()
                continue
            try:
                if held != (precision, compile_):
                    release(loaded)
                    loaded, held = None, None
                    loaded, timing = load_variant(model, precision, compile_, args.compile_backend, size, device)
                    held = (precision, compile_)
                    run.update(timing)
                set_cache(loaded, cache)
                set_tiling(loaded, RenderSettings(width=size[0], height=size[1], frames=size[2]))
                run.update(measure(loaded, size, args.steps, default_steps, device), status="ok")
                run["run_variant"] = loaded.run_variant + ("" if cache == "none" else f" cache={cache}")
                last_wall[size] = run["measured_wall_s"]
            except Exception as exc:  # one variant failing (or OOM) must not end the benchmark
                import torch

                status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "failed"
                run.update(status=status, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                release(loaded)
                loaded, held = None, None
            results.data["runs"].append(run)
            results.write()
        if name == "bf16" and loaded is not None and deadline.left() > 4 * last_wall.get(sizes[-1], 0.0):
            set_cache(loaded, "none")
            try:
                results.data["pipeline"] = pipeline_share(loaded, sizes[-1], args.pipeline_steps, args.clips, device)
            except Exception as exc:
                results.data["pipeline"] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            results.write()
    release(loaded)


def _seed_claim(results: Results) -> dict[str, Any]:
    measured = {
        r["variant"]: r["s_per_clip"]
        for r in results.data["runs"]
        if r.get("status") == "ok" and r["size"] == SEED_CLAIM["size"]
    }
    return {**SEED_CLAIM, "measured_s_per_clip": measured}


def _watchdog(results: Results, after_s: float) -> threading.Timer:
    """Past the deadline and its grace, a run still going (a compile, a hung kernel) is cut: the
    file already holds every finished run; it is marked and the process ends."""

    def stop() -> None:
        results.data.update(complete=False, aborted=f"still running {after_s:.0f}s after start")
        results.write()
        os._exit(3)

    timer = threading.Timer(after_s, stop)
    timer.daemon = True
    timer.start()
    return timer


def _print_summary(results: Results) -> None:
    print(f"results: {results.path}")
    for r in results.data["runs"]:
        mark = " (extrapolated)" if r.get("extrapolated") else ""
        what = (
            f"{r.get('s_per_clip')} s/clip{mark}, peak {r.get('peak_vram_gb')} GB"
            if r["status"] == "ok"
            else r.get("error")
        )
        print(f"  {r['size']:>12} {r['variant']:<13} {r['status']:<8} {what}")
    if results.data.get("pipeline"):
        print(f"  pipeline: {json.dumps(results.data['pipeline'])}")


if __name__ == "__main__":
    main()
