"""A GPU that never waits and one that runs out of memory: the renderer's two stages
(farm/pipelining.py) write the same bytes pipelined as serially and keep the generator busier
when encoding is slow; an out-of-memory attempt fails as ``oom`` and is sent on to a pool with
more VRAM (scheduler and fleet, without Ray; tests/test_cluster.py has it on a Ray cluster)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from farm import render
from farm.cluster import PoolCapacity
from farm.expand import expand
from farm.faults import Fault
from farm.fleet import Fleet, StartRenderer
from farm.manifest import load_manifest
from farm.models import resolve_model
from farm.models.loading import set_tiling
from farm.pipelining import ClipFlow
from farm.render import Renderer
from farm.scheduler import Demand, Outcome, Scheduler
from farm.storage import OutputTarget
from farm.task import FailureKind, Pool, RenderSettings, Requirements, Task

SMALL, BIG = Pool("small", "L4", 24, 0.8), Pool("big", "H100", 80, 4.0)


def test_clips_are_finished_one_at_a_time_in_the_order_they_were_generated():
    flow, events, lock = ClipFlow(), [], threading.Lock()

    def clip(i: int) -> None:
        with flow.in_hand():
            try:
                with flow.generating() as ticket:
                    with lock:
                        events.append(("gen", i))
                    if i == 2:
                        raise RuntimeError("generation failed")  # gives up its finishing turn
                    time.sleep(0.01)
            except RuntimeError:
                return
            with flow.finishing(ticket):
                with lock:
                    events.append(("fin", i))
                time.sleep(0.02 if i == 0 else 0.0)

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(clip, range(5)))
    generated = [i for kind, i in events if kind == "gen"]
    finished = [i for kind, i in events if kind == "fin"]
    assert sorted(generated) == [0, 1, 2, 3, 4] and finished == [i for i in generated if i != 2]


@pytest.fixture(scope="module")
def tiny_renderer(tmp_path_factory, shared_model_cache):
    folder = tmp_path_factory.mktemp("pipeline")
    render_keys = "{width: 64, height: 64, frames: 9, steps: 3}"
    (folder / "m.yaml").write_text(
        f"campaign: p\nprompt: 'clip {{n}}'\naxes: {{n: [1, 2, 3, 4, 5]}}\nrender: {render_keys}\n"
    )
    tasks = expand(load_manifest(folder / "m.yaml")).tasks
    return Renderer(tasks[0].model, threads=1), tasks


def slow_encoding(monkeypatch, seconds: float) -> None:
    """Encoding (or an upload) that takes ``seconds`` more, waiting as on an encoder or a network."""
    encode = render.encode_mp4

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return encode(*args, **kwargs)

    monkeypatch.setattr(render, "encode_mp4", slow)


def shares_and_digests(renderer: Renderer, tasks: list[Task], out) -> tuple[dict[int, float], dict[int, list[str]]]:
    """Render ``tasks`` one call at a time (depth 1) and two at a time (depth 2), as Ray runs the
    actor with max_concurrency 1 or 2: the generate share and the clips' checksums of each."""
    shares, digests = {}, {}
    for depth in (1, 2):
        renderer.flow = ClipFlow()
        with ThreadPoolExecutor(max_workers=depth) as pool:
            results = list(pool.map(lambda t, d=depth: renderer.render(t, 1, OutputTarget(str(out / f"d{d}"))), tasks))
        assert all(r.succeeded for r in results), [r.error for r in results]
        shares[depth] = renderer.utilisation().generate_share
        digests[depth] = [r.sha256 for r in results]
    return shares, digests


def test_the_pipelined_renderer_writes_exactly_the_bytes_the_serial_one_does(tiny_renderer, tmp_path, monkeypatch):
    renderer, tasks = tiny_renderer
    slow_encoding(monkeypatch, 0.1)
    shares, digests = shares_and_digests(renderer, tasks[:4], tmp_path)
    assert digests[1] == digests[2] and len(set(digests[1])) == 4
    assert shares[2] > shares[1], shares


def test_with_slow_encoding_the_pipelined_renderer_keeps_the_generator_busier(tmp_path, monkeypatch):
    # A generator that takes a fixed 200 ms (a stand-in for the GPU: no CPU of this machine's),
    # and encoding as slow: serially it generates half the time, pipelined most of it.
    model = resolve_model("fake:sleep-200ms", tmp_path)
    tasks = [Task(f"clip-{i}", f"clip {i}", i, model, RenderSettings(16, 16, 3, 8, 1, 1.0)) for i in range(5)]
    slow_encoding(monkeypatch, 0.2)
    shares, digests = shares_and_digests(Renderer(model), tasks, tmp_path)
    assert digests[1] == digests[2]
    assert shares[1] < 0.55 and shares[2] > 0.7, shares


def test_an_out_of_memory_attempt_fails_as_oom_and_the_renderer_carries_on(faults, tmp_path):
    model = resolve_model("fake:noop", tmp_path)
    renderer = Renderer(model)
    task = Task("oom-task", "an oom clip", 0, model, RenderSettings(16, 16, 3, 8, 1, 1.0))
    faults(Fault("oom clip", fail_attempts=1, action="oom"))
    first = renderer.render(task, 1, OutputTarget(str(tmp_path)))
    assert first.error_kind is FailureKind.OOM and "out of memory" in first.error
    assert renderer.render(task, 2, OutputTarget(str(tmp_path))).succeeded


def tasks_on(model_needs: Requirements, n: int = 1) -> list[Task]:
    model = resolve_model("fake:noop", __import__("pathlib").Path("."))
    return [Task(f"t{i}", "p", i, model, RenderSettings(16, 16, 3, 8, 1, 1.0), needs=model_needs) for i in range(n)]


def test_the_scheduler_sends_an_oom_retry_to_a_pool_with_more_vram_where_there_is_one():
    clock = [0.0]
    s = Scheduler(clock=lambda: clock[0])
    for pool in (SMALL, BIG):
        s.add_pool(pool)
    s.add_slot("small-1", "small")
    s.add_job("j", tasks_on(Requirements()))
    (first,) = s.next_dispatches()
    assert first.slot == "small-1"
    decision = s.record("small-1", "j", first.task.task_id, False, "CUDA out of memory", oom=True)
    assert decision.outcome is Outcome.RETRY
    clock[0] = 60.0
    assert s.next_dispatches() == []  # the small pool's slot no longer takes it
    s.add_slot("big-1", "big")
    (second,) = s.next_dispatches()
    assert second.slot == "big-1" and second.attempt == 2 and second.task.needs.min_vram_gb > 24
    # Where no pool has more, the retry goes where it was (the error may not come back).
    s.record("big-1", "j", second.task.task_id, False, "CUDA out of memory", oom=True)
    clock[0] = 120.0
    (third,) = s.next_dispatches()
    assert third.slot == "big-1" and third.attempt == 3


def test_the_fleet_starts_a_renderer_in_the_larger_pool_for_work_the_smaller_pools_renderers_cannot_take():
    model = tasks_on(Requirements())[0].model
    fleet = Fleet(lambda m, cap: f"handle-{cap.pool.name}")
    fleet.set_capacity([PoolCapacity(SMALL, 2, ("n1",), 1.0), PoolCapacity(BIG, 1, ("n2",), 1.0)])
    (start,) = [d for d in fleet.scale([Demand(model.identity, 0, [Requirements()], 1)], {model.identity: model})]
    assert isinstance(start, StartRenderer) and start.pool == "small"
    fleet.start(start)
    more = Requirements(min_vram_gb=24.000001)  # what the scheduler asks of an OOM retry from the small pool
    decisions = fleet.scale([Demand(model.identity, 0, [more], 1)], {model.identity: model})
    assert [(type(d), d.pool) for d in decisions] == [(StartRenderer, "big")]


def test_renderer_results_say_the_variant_they_ran(tiny_renderer, tmp_path):
    renderer, tasks = tiny_renderer
    result = renderer.render(replace(tasks[0], task_id="variant-check"), 1, OutputTarget(str(tmp_path)))
    assert result.run_variant == "bf16 compute=float32 cpu" and result.weights_identity == tasks[0].model.identity
    vae = renderer._loaded.pipeline.vae
    assert vae.use_slicing and not vae.use_tiling  # tiles only above 480p: a function of the size alone
    set_tiling(renderer._loaded, RenderSettings(width=1280, height=720))
    assert vae.use_tiling
    set_tiling(renderer._loaded, tasks[0].settings)
    assert not vae.use_tiling
