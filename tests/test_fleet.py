"""The renderer fleet (farm/fleet.py), without Ray: a fake factory and a fake clock. Which pool a
renderer starts in, how many, which idle ones make room or go on scale-down, replacement after a
loss, a model that does not load, and the timing of running attempts."""

from __future__ import annotations

from farm.cluster import PoolCapacity
from farm.fleet import (
    FailModelJobs,
    Fleet,
    FleetDecision,
    RendererReady,
    RetireRenderer,
    StartRenderer,
    TimedOut,
    pool_of,
)
from farm.render import RendererInfo
from farm.scheduler import Demand, Dispatch
from farm.task import ModelKind, ModelRef, Pool, RenderSettings, Requirements, Task

WAN = ModelRef("wan", ModelKind.BUILTIN, "/m/wan", "builtin:wan", "WanPipeline")
LTX = ModelRef("ltx", ModelKind.BUILTIN, "/m/ltx", "builtin:ltx", "LTXPipeline")
MODELS = {m.identity: m for m in (WAN, LTX)}
L4 = Pool("l4", "L4", 24, cost_per_hour=0.8)
A10G = Pool("a10g", "A10G", 24, cost_per_hour=0.8)  # as cheap as l4: the name breaks the tie
H100 = Pool("h100", "H100", 80, cost_per_hour=4.0)
HEAVY = Requirements(min_vram_gb=40)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeFactory:
    """Starts nothing: hands out numbered handles and remembers what it was asked for."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []  # (model spec, pool)

    def __call__(self, model: ModelRef, capacity: PoolCapacity) -> str:
        self.started.append((model.spec, capacity.pool.name))
        return f"handle-{len(self.started)}"


def fleet_with(*pools: tuple[Pool, int], nodes_per_pool: int = 1) -> tuple[Fleet, FakeFactory, FakeClock]:
    factory, clock = FakeFactory(), FakeClock()
    fleet = Fleet(factory, clock)
    fleet.set_capacity(
        PoolCapacity(pool, slots, tuple(f"{pool.name}-node{i}" for i in range(nodes_per_pool)), 1.0)
        for pool, slots in pools
    )
    return fleet, factory, clock


def demand(model: ModelRef, queued: int, *needs: Requirements, priority: int = 0) -> Demand:
    return Demand(model.identity, priority, list(needs) or [Requirements()], queued)


def carry_out(fleet: Fleet, decisions: list[FleetDecision]) -> list[str]:
    """What the controller does with the decisions that change the fleet; returns started slots."""
    started = []
    for d in decisions:
        if isinstance(d, StartRenderer):
            fleet.start(d)
            started.append(d.slot)
        elif isinstance(d, RetireRenderer):
            fleet.remove(d.slot)
    return started


def info(model: ModelRef, node: str = "node-a", load_error: str = "") -> RendererInfo:
    return RendererInfo("actor", node, "cpu", model.identity, 1.5, 1, 4242, load_error)


def ready(fleet: Fleet, slot: str, node: str = "node-a") -> None:
    (decision,) = fleet.loaded(slot, info(fleet.renderers[slot].model, node))
    assert isinstance(decision, RendererReady) and decision.slot == slot


def dispatch(job: str, task_id: str, slot: str, attempt: int = 1) -> Dispatch:
    settings = RenderSettings(64, 64, 9, 8, 4, 5.0)
    return Dispatch(job, Task(task_id, "a prompt", 0, WAN, settings), attempt, slot)


def test_a_renderer_starts_in_the_cheapest_fitting_pool_with_a_free_slot():
    fleet, factory, _ = fleet_with((H100, 2), (L4, 1), (A10G, 1))
    (first,) = fleet.scale([demand(WAN, 5)], MODELS)
    assert (first.pool, first.model) == ("a10g", WAN)  # l4 and a10g cost the same: by name
    assert "a10g is the cheapest fitting pool" in first.reason and pool_of(first.slot) == "a10g"
    carry_out(fleet, [first])
    assert factory.started == [("wan", "a10g")] and fleet.renderers[first.slot].handle == "handle-1"
    pools = []
    for _ in range(3):
        decisions = fleet.scale([demand(WAN, 5)], MODELS)
        pools += [d.pool for d in decisions]
        carry_out(fleet, decisions)
    assert pools == ["l4", "h100", "h100"]  # cheap pools full: the dear one
    assert fleet.scale([demand(WAN, 5)], MODELS) == []  # every slot taken


def test_tasks_that_need_more_go_only_to_pools_that_fit_them():
    fleet, _, _ = fleet_with((L4, 4), (H100, 1))
    (d,) = fleet.scale([demand(WAN, 3, HEAVY)], MODELS)
    assert d.pool == "h100"
    carry_out(fleet, [d])
    assert fleet.scale([demand(WAN, 3, HEAVY)], MODELS) == []  # l4 has room, but does not fit
    (light,) = fleet.scale([demand(WAN, 3, HEAVY, Requirements())], MODELS)  # a job with both kinds
    assert light.pool == "l4"


def test_no_more_renderers_than_queued_tasks_and_one_start_per_job_a_turn():
    fleet, factory, _ = fleet_with((L4, 8))
    turns = [carry_out(fleet, fleet.scale([demand(WAN, 2)], MODELS)) for _ in range(4)]
    assert [len(t) for t in turns] == [1, 1, 0, 0] and len(factory.started) == 2
    # Loading renderers count too: a slow load does not make the fleet start more of them.
    assert not any(r.ready for r in fleet.renderers.values())
    # Two jobs of one model each get one start a turn, highest priority first.
    (urgent, other) = fleet.scale([demand(LTX, 9, priority=5), demand(LTX, 9)], MODELS)
    assert urgent.model == other.model == LTX


def test_a_job_whose_model_no_running_job_names_starts_nothing():
    fleet, _, _ = fleet_with((L4, 2))
    assert fleet.scale([demand(WAN, 3)], {}) == []


def test_an_idle_renderer_of_another_model_makes_room_only_when_its_model_has_no_work():
    fleet, _, _ = fleet_with((L4, 1))
    (wan_slot,) = carry_out(fleet, fleet.scale([demand(WAN, 1)], MODELS))
    # Loading: never stopped for another model.
    assert fleet.scale([demand(LTX, 4)], MODELS) == []
    ready(fleet, wan_slot)
    # Idle, but wan still has queued work (it is only waiting for a slot of its own).
    assert fleet.scale([demand(LTX, 4), demand(WAN, 1)], MODELS) == []
    # Busy: never stopped.
    fleet.sent("ref-1", (dispatch("j", "t1", wan_slot),))
    assert fleet.scale([demand(LTX, 4)], MODELS) == []
    fleet.collected("ref-1")
    # Idle and its model has no work: retired first, then the new one starts in its slot.
    retire, start = fleet.scale([demand(LTX, 4)], MODELS)
    assert retire == RetireRenderer(wan_slot, retire.reason) and "wan has no queued work" in retire.reason
    assert isinstance(start, StartRenderer) and (start.pool, start.model) == ("l4", LTX)
    carry_out(fleet, [retire, start])
    assert [r.model for r in fleet.renderers.values()] == [LTX]


def test_a_lost_renderer_is_forgotten_with_its_work_and_replaced():
    fleet, factory, _ = fleet_with((L4, 1))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 3)], MODELS))
    fleet.watch_start("info-ref", slot)
    assert fleet.started_slot("info-ref") == slot and fleet.started_slot("info-ref") is None
    ready(fleet, slot)
    fleet.sent("r1", (dispatch("j", "t1", slot),))
    fleet.sent("r2", (dispatch("j", "t2", slot),))
    assert fleet.waiting() == ["r1", "r2"] and fleet.scale([demand(WAN, 3)], MODELS) == []  # pool full
    lost = fleet.remove(slot)
    assert [d.task.task_id for _, batch in lost.queue for d in batch] == ["t1", "t2"]  # t1 was running: the head
    assert fleet.waiting() == [] and fleet.remove(slot) is None
    (replacement,) = fleet.scale([demand(WAN, 3)], MODELS)
    assert replacement.pool == "l4" and replacement.slot != slot
    carry_out(fleet, [replacement])
    assert len(factory.started) == 2


def test_a_renderer_retired_while_loading_leaves_nothing_to_wait_for():
    fleet, _, _ = fleet_with((L4, 1))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 1)], MODELS))
    fleet.watch_start("info-ref", slot)
    fleet.remove(slot)
    assert fleet.waiting() == [] and fleet.loaded(slot, info(WAN)) == []


def test_a_renderer_whose_model_does_not_load_fails_the_models_jobs_and_is_retired():
    fleet, _, _ = fleet_with((L4, 2))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 2)], MODELS))
    fail, retire = fleet.loaded(slot, info(WAN, load_error="no such weights"))
    assert fail == FailModelJobs(WAN, "model did not load: no such weights")
    assert retire == RetireRenderer(slot, "model did not load")
    assert fleet.ready_count(WAN.identity) == 0


def test_a_loaded_renderer_is_ready_with_what_it_reported():
    fleet, _, _ = fleet_with((L4, 2))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 2)], MODELS))
    assert fleet.states("l4") == {"busy": 0, "idle": 0, "loading": 1} and fleet.busy_pools() == {"l4"}
    ready(fleet, slot, node="n7")
    r = fleet.renderers[slot]
    assert (r.node_id, r.pid, r.loads, r.load_s) == ("n7", 4242, 1, 1.5) and fleet.ready_count(WAN.identity) == 1
    assert fleet.states("l4") == {"busy": 0, "idle": 1, "loading": 0} and fleet.busy_pools() == set()
    fleet.sent("r1", (dispatch("j", "t1", slot),))
    assert fleet.states("l4") == {"busy": 1, "idle": 0, "loading": 0} and fleet.running_by_pool() == {"l4": 1}
    assert fleet.pools()[0]["renderers"][0]["busy"] == ["j/t1"]


def test_scale_down_releases_only_whole_idle_nodes():
    fleet, _, _ = fleet_with((L4, 4))
    slots = carry_out(fleet, [StartRenderer(f"l4-{i}", "l4", WAN, "") for i in range(4)])
    for slot, node in zip(slots, ["n1", "n1", "n2", "n2"], strict=True):
        ready(fleet, slot, node)
    fleet.sent("r1", (dispatch("j", "t1", "l4-3"),))  # n2 is half busy: stopping its idle one frees nothing
    assert {d.slot for d in fleet.release_idle("l4", keep=0)} == {"l4-0", "l4-1"}
    assert {d.slot for d in fleet.release_idle("l4", keep=2)} == {"l4-0", "l4-1"}
    assert fleet.release_idle("l4", keep=3) == []  # releasing n1 would leave 2 < 3
    assert all(d.reason == "pool scaled down: its node may go" for d in fleet.release_idle("l4", keep=0))


def test_a_running_attempt_is_timed_from_when_it_became_the_head():
    fleet, _, clock = fleet_with((L4, 1))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 2)], MODELS))
    ready(fleet, slot)
    first, second = dispatch("j", "t1", slot), dispatch("j", "t2", slot)
    fleet.sent("r1", (first,))
    fleet.sent("r2", (second,))
    clock.now = 8.0
    assert fleet.overdue({"j": 10.0}) == []
    clock.now = 11.0
    (late,) = fleet.overdue({"j": 10.0})
    assert late == TimedOut(slot, "r1", (first,), f"timed out after 10s on renderer {slot}")
    assert fleet.collected("r1") == (slot, (first,))  # the next in the queue starts its clock now
    clock.now = 20.0
    assert fleet.overdue({"j": 10.0}) == [] and fleet.heads()[0][1] == 9.0
    assert fleet.overdue({"other-job": 1.0}) == []  # a job the caller does not time
    (stop,) = fleet.overdue({"j": 10.0}, stop=["j"])
    assert stop == RetireRenderer(slot, "job cancelled")


def test_results_collected_out_of_order_keep_the_head_running():
    fleet, _, clock = fleet_with((L4, 1))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 2)], MODELS))
    ready(fleet, slot)
    fleet.sent("r1", (dispatch("j", "t1", slot),))
    fleet.sent("r2", (dispatch("j", "t2", slot),))
    clock.now = 5.0
    fleet.collected("r2")
    assert [ref for ref, _ in fleet.renderers[slot].queue] == ["r1"] and fleet.heads()[0][1] == 5.0


def test_a_batch_may_run_the_jobs_timeout_for_each_attempt_in_it():
    fleet, _, clock = fleet_with((L4, 1))
    (slot,) = carry_out(fleet, fleet.scale([demand(WAN, 3)], MODELS))
    ready(fleet, slot)
    batch = tuple(dispatch("j", f"t{i}", slot) for i in range(3))
    fleet.sent("r1", batch)
    assert fleet.running_by_pool() == {"l4": 3} and fleet.pools()[0]["renderers"][0]["busy"] == ["j/t0", "j/t1", "j/t2"]
    clock.now = 29.0
    assert fleet.overdue({"j": 10.0}) == []
    clock.now = 31.0
    assert fleet.overdue({"j": 10.0}) == [TimedOut(slot, "r1", batch, f"timed out after 10s on renderer {slot}")]
    assert fleet.collected("r1") == (slot, batch) and fleet.waiting() == []
