"""The pure scheduler: routing to pools, priorities and fair sharing across jobs, bounded
in-flight work, retries with backoff, lost renderers, poison tasks, bad slots, cancel."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from farm.routing import fitting_pools, pools_fitting_any
from farm.scheduler import Backoff, JobLimits, Outcome, Scheduler
from farm.task import ModelRef, Pool, RenderSettings, Requirements, Task

MODEL = ModelRef("tiny", "builtin", "/m", "builtin:test", "WanPipeline")
SETTINGS = RenderSettings(64, 64, 9, 8, 4, 5.0)
CPU = Pool("cpu")


def make_tasks(n: int, prefix: str = "t", needs: Requirements = Requirements()) -> list[Task]:
    return [Task(f"{prefix}{i:03d}", f"prompt {i}", i, MODEL, SETTINGS, needs=needs) for i in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler_with(slots: dict[str, Pool], **kw) -> Scheduler:
    s = Scheduler(**kw)
    for slot, pool in slots.items():
        s.add_pool(pool)
        s.add_slot(slot, pool.name)
    return s


def run_to_end(s: Scheduler, fail: Callable | None = None) -> list:
    log = []
    while not s.idle:
        dispatches = s.next_dispatches()
        assert dispatches, "stuck"
        for d in dispatches:
            log.append(d)
            s.record(d.slot, d.job_id, d.task.task_id, succeeded=not (fail and fail(d)))
    return log


def test_never_more_than_the_bound_in_flight_per_slot_and_every_slot_kept_busy():
    s = scheduler_with({"a": CPU, "b": CPU, "c": CPU}, in_flight_per_slot=2)
    s.add_job("j", make_tasks(20), limits=JobLimits(max_attempts=1))
    first = s.next_dispatches()
    assert len(first) == 6 and Counter(d.slot for d in first) == {"a": 2, "b": 2, "c": 2}
    assert s.next_dispatches() == []
    s.record("b", "j", first[1].task.task_id, succeeded=True)
    assert [d.slot for d in s.next_dispatches()] == ["b"]
    assert s.progress("j").in_flight == 6 and s.progress("j").queued == 13


def test_tasks_go_only_to_pools_that_fit_and_cheapest_first():
    small = Pool("small", "L4", 24, cost_per_hour=0.8)
    big = Pool("big", "H100", 80, cost_per_hour=4.0)
    s = scheduler_with({"s1": small, "b1": big}, in_flight_per_slot=1)
    s.add_job("j", make_tasks(2, "light") + make_tasks(2, "heavy", Requirements(min_vram_gb=40)))
    assert [p.name for p in s.routes(Requirements(min_vram_gb=40))] == ["big"]
    assert [p.name for p in s.routes(Requirements())] == ["small", "big"]
    assert s.routes(Requirements(min_vram_gb=100)) == [] and s.routes(Requirements(gpu_type="A100")) == []
    log = run_to_end(s)
    assert all(d.slot == "b1" for d in log if d.task.task_id.startswith("heavy"))
    assert log[0].slot == "s1" and log[0].task.task_id.startswith("light")  # cheap pool filled first


def test_routing_is_cheapest_first_then_by_name_and_the_same_for_every_caller():
    l4, a10g = Pool("l4", "L4", 24, cost_per_hour=0.8), Pool("a10g", "A10G", 24, cost_per_hour=0.8)
    cpu, h100 = Pool("cpu"), Pool("h100", "H100", 80, cost_per_hour=4.0)
    pools = [h100, l4, cpu, a10g]
    assert fitting_pools(pools, Requirements()) == [cpu, a10g, l4, h100]  # cpu has no VRAM limit
    assert fitting_pools(pools, Requirements(gpu_type="l4")) == [l4]  # GPU types match whatever the case
    assert fitting_pools(pools, Requirements(min_vram_gb=40)) == [cpu, h100]
    assert fitting_pools(pools, Requirements(pool="h100", min_vram_gb=40)) == [h100]
    assert fitting_pools(reversed(pools), Requirements()) == fitting_pools(pools, Requirements())
    assert pools_fitting_any(pools, [Requirements(gpu_type="H100"), Requirements(gpu_type="L4")]) == [l4, h100]
    assert pools_fitting_any(pools, []) == []
    s = scheduler_with({"l": l4, "a": a10g, "h": h100})
    assert s.routes(Requirements(min_vram_gb=10)) == [a10g, l4, h100]  # the pools it knows, routed the same way


def test_higher_priority_first_and_equal_priorities_share_fairly():
    s = scheduler_with({f"s{i}": CPU for i in range(4)}, in_flight_per_slot=1)
    s.add_job("big", make_tasks(1000, "big"))
    s.add_job("small", make_tasks(4, "small"))
    first = s.next_dispatches()
    assert Counter(d.job_id for d in first) == {"big": 2, "small": 2}  # not starved behind 1,000 tasks
    s.add_job("urgent", make_tasks(3, "urgent"), priority=10)
    for d in first:
        s.record(d.slot, d.job_id, d.task.task_id, succeeded=True)
    second = s.next_dispatches()
    assert Counter(d.job_id for d in second)["urgent"] == 3


def test_failures_retry_after_backoff_then_fail_final():
    clock = FakeClock()
    s = scheduler_with({"a": CPU}, backoff=Backoff(base_s=1.0, max_s=10.0), clock=clock)
    s.add_job("j", make_tasks(1), limits=JobLimits(max_attempts=3, bad_slot_limit=10))
    (d,) = s.next_dispatches()
    decision = s.record("a", "j", d.task.task_id, succeeded=False, error="boom")
    assert decision.outcome is Outcome.RETRY and decision.retry_in_s == 1.0
    assert s.next_dispatches() == [] and not s.idle
    clock.now = 1.0
    (d2,) = s.next_dispatches()
    assert d2.attempt == 2 and s.record("a", "j", d2.task.task_id, False, "boom").retry_in_s == 2.0
    clock.now = 3.0
    (d3,) = s.next_dispatches()
    final = s.record("a", "j", d3.task.task_id, succeeded=False, error="boom")
    assert final.outcome is Outcome.FAILED and "3 attempts failed; last: boom" in final.reason
    assert s.idle and s.progress("j").failed == 1


def test_lost_slot_requeues_without_spending_attempts_and_a_poison_task_fails():
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=1)
    s.add_job("j", make_tasks(2), limits=JobLimits(max_attempts=1, max_interruptions=2))
    dispatched = {d.slot: d for d in s.next_dispatches()}
    (decision,) = s.remove_slot("a", "node lost", running=dispatched["a"].task.task_id)
    assert decision.outcome is Outcome.REQUEUED
    s.add_slot("a2", "cpu")
    again = [d for d in s.next_dispatches() if d.task == dispatched["a"].task]
    assert again and again[0].attempt == 1  # the interrupted attempt was not spent
    (poison,) = s.remove_slot(again[0].slot, "OOM", running=again[0].task.task_id)
    assert poison.outcome is Outcome.FAILED and "2 renderers died running it; last: OOM" in poison.reason


def test_a_slot_that_keeps_failing_a_job_is_taken_out_of_it():
    s = scheduler_with({"bad": CPU, "good": CPU}, in_flight_per_slot=1, backoff=Backoff(0, 0))
    s.add_job("j", make_tasks(10), limits=JobLimits(max_attempts=5, bad_slot_limit=2))
    log = run_to_end(s, fail=lambda d: d.slot == "bad")
    assert sum(d.slot == "bad" for d in log) == 2
    assert s.progress("j").succeeded == 10 and s.banned_slots("j") == {"bad"}


def test_when_every_slot_is_taken_out_the_rest_of_the_job_fails_instead_of_hanging():
    s = scheduler_with({"only": CPU}, in_flight_per_slot=1, backoff=Backoff(0, 0))
    s.add_job("j", make_tasks(3), limits=JobLimits(max_attempts=5, bad_slot_limit=2))
    for _ in range(2):
        (d,) = s.next_dispatches()
        s.record("only", "j", d.task.task_id, succeeded=False, error="bad GPU")
    assert s.next_dispatches() == []
    drained = s.drain_decisions()
    assert len(drained) == 3 and all(d.outcome is Outcome.FAILED for d in drained)
    assert s.idle and s.progress("j").failed == 3


def test_cancel_stops_dispatch_and_reports_in_flight_work():
    s = scheduler_with({"a": CPU}, in_flight_per_slot=2)
    s.add_job("j", make_tasks(5))
    running = s.next_dispatches()
    assert sorted(s.cancel("j")) == sorted(("a", d.task.task_id) for d in running)
    assert s.next_dispatches() == []
    for d in running:
        assert s.record("a", "j", d.task.task_id, succeeded=False).outcome is Outcome.DROPPED
    assert s.idle and s.progress("j").cancelled


def test_backoff_is_capped():
    assert [Backoff(0.5, 3.0).delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_each_retry_is_released_when_its_own_backoff_ends():
    # Delayed retries are not looked at before the earliest is due: one recorded later with a
    # shorter backoff must not wait for an earlier, longer one, nor run before its own ends.
    clock = FakeClock()
    backoff = Backoff(base_s=1.0, max_s=10.0)
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=1, backoff=backoff, clock=clock)
    for job in ("long", "short"):
        s.add_job(job, make_tasks(1, job), limits=JobLimits(max_attempts=3, bad_slot_limit=10))
    slots = {d.job_id: d.slot for d in s.next_dispatches()}
    s.record(slots["long"], "long", "long000", succeeded=False)  # attempt 1: due at 1.0
    clock.now = 1.0
    assert [(d.job_id, d.attempt) for d in s.next_dispatches()] == [("long", 2)]
    s.record(slots["long"], "long", "long000", succeeded=False)  # attempt 2: due at 1.0 + 2.0
    s.record(slots["short"], "short", "short000", succeeded=False)  # attempt 1: due at 1.0 + 1.0
    clock.now = 1.99
    assert s.next_dispatches() == []
    clock.now = 2.0
    assert [(d.job_id, d.attempt) for d in s.next_dispatches()] == [("short", 2)]
    clock.now = 2.99
    assert s.next_dispatches() == []
    clock.now = 3.0
    assert [(d.job_id, d.attempt) for d in s.next_dispatches()] == [("long", 3)]


def test_free_slots_fill_one_task_each_per_round_cheapest_first():
    cheap, dear = Pool("cheap", cost_per_hour=1.0), Pool("dear", cost_per_hour=5.0)
    s = scheduler_with({"c1": cheap, "c2": cheap, "d1": dear, "none": Pool("tiny", vram_gb=1.0)}, in_flight_per_slot=3)
    s.add_job("j", make_tasks(7, needs=Requirements(min_vram_gb=8.0)))
    assert [d.slot for d in s.next_dispatches()] == ["c1", "c2", "d1", "c1", "c2", "d1", "c1"]
    assert s.next_dispatches() == []  # the rest of the job waits for a free place
    s.record("d1", "j", s.slot_load("d1")[0][1], succeeded=True)
    assert s.progress("j").queued == 0 and s.next_dispatches() == []


# --------------------------------------------------------------------------- task graphs


def chain(n: int, prefix: str = "s") -> list[Task]:
    """A chain s0 ← s1 ← … and a film waiting on all of them."""
    tasks = [
        Task(f"{prefix}{i}", "p", 0, MODEL, SETTINGS, parents=(f"{prefix}{i - 1}",) if i else ()) for i in range(n)
    ]
    return [*tasks, Task(f"{prefix}film", "", 0, MODEL, SETTINGS, parents=tuple(t.task_id for t in tasks))]


def test_a_child_is_dispatched_only_after_its_parents_succeed() -> None:
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=2)
    s.add_job("j", chain(3))
    order = []
    while not s.idle:
        dispatched = s.next_dispatches()
        assert len(dispatched) == 1, "a chain has one task ready at a time"
        d = dispatched[0]
        order.append(d.task.task_id)
        assert s.record(d.slot, "j", d.task.task_id, True).outcome is Outcome.DONE
    assert order == ["s0", "s1", "s2", "sfilm"]
    p = s.progress("j")
    assert (p.succeeded, p.failed, p.waiting, p.blocked) == (4, 0, 0, 0)


def test_a_parent_failing_for_good_blocks_every_descendant_and_nothing_else() -> None:
    s = scheduler_with({"a": CPU}, backoff=Backoff(0, 0))
    other = Task("free", "p", 1, MODEL, SETTINGS)
    s.add_job("j", [*chain(4), other], limits=JobLimits(max_attempts=1))
    seen = []
    while not s.idle:
        for d in s.next_dispatches():
            seen.append(d.task.task_id)
            ok = d.task.task_id != "s1"
            s.record(d.slot, "j", d.task.task_id, ok)
    blocked = [d for d in s.drain_decisions() if d.outcome is Outcome.BLOCKED]
    assert sorted(d.task_id for d in blocked) == ["s2", "s3", "sfilm"]
    assert all(d.final and d.task is not None for d in blocked)
    assert "s2" not in seen and "free" in seen
    p = s.progress("j")
    assert (p.succeeded, p.failed, p.blocked, p.waiting) == (2, 4, 3, 0) and p.finished


def test_keyframe_graph_runs_its_segments_side_by_side() -> None:
    keys = [Task(f"k{i}", "p", 0, MODEL, SETTINGS) for i in range(4)]
    segs = [Task(f"g{i}", "p", 0, MODEL, SETTINGS, parents=(f"k{i}", f"k{i + 1}")) for i in range(3)]
    film = Task("film", "", 0, MODEL, SETTINGS, parents=("g0", "g1", "g2"))
    s = scheduler_with({f"r{i}": CPU for i in range(4)}, in_flight_per_slot=1)
    s.add_job("j", [film, *segs, *keys])
    first = s.next_dispatches()
    assert sorted(d.task.task_id for d in first) == ["k0", "k1", "k2", "k3"]
    for d in first:
        s.record(d.slot, "j", d.task.task_id, True)
    second = s.next_dispatches()
    assert sorted(d.task.task_id for d in second) == ["g0", "g1", "g2"], "segments render at once"


def test_parents_done_before_admission_do_not_hold_their_children() -> None:
    s = scheduler_with({"a": CPU})
    s.add_job("j", chain(3)[2:])  # s2 and the film: s0, s1 were done already
    assert [d.task.task_id for d in s.next_dispatches()] == ["s2"]


def test_cancel_clears_waiting_tasks_and_a_lost_renderer_requeues_mid_graph() -> None:
    s = scheduler_with({"a": CPU})
    s.add_job("j", chain(3))
    (d,) = s.next_dispatches()
    assert s.remove_slot("a", running="s0")[0].outcome is Outcome.REQUEUED
    s.add_slot("b", "cpu")
    (d,) = s.next_dispatches()
    assert d.task.task_id == "s0" and d.attempt == 1
    s.cancel("j")
    assert s.record("b", "j", "s0", True).outcome is Outcome.DONE
    p = s.progress("j")
    assert p.waiting == 0 and p.finished


def test_a_child_waits_for_a_parent_another_job_renders_and_its_cancel_blocks_the_child() -> None:
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=1)
    first = chain(2, "x")  # x0 ← x1 ← xfilm
    s.add_job("A", first[:1])  # A renders x0
    s.add_job("B", first[1:], elsewhere={"x0"})  # B's x1 waits for A's x0
    assert [d.task.task_id for d in s.next_dispatches()] == ["x0"]
    s.record("a", "A", "x0", True)
    assert [d.task.task_id for d in s.next_dispatches()] == ["x1"]

    s.add_job("C", [Task("y0", "p", 0, MODEL, SETTINGS)])
    s.add_job("D", [Task("y1", "p", 0, MODEL, SETTINGS, parents=("y0",))], elsewhere={"y0"})
    s.cancel("C")  # y0 will never render: D's y1 is blocked, not left waiting for ever
    (blocked,) = [d for d in s.drain_decisions() if d.outcome is Outcome.BLOCKED]
    assert (blocked.job_id, blocked.task_id) == ("D", "y1") and s.progress("D").finished


def test_waiting_tasks_are_not_backlog_the_pools_are_sized_for() -> None:
    s = scheduler_with({"a": CPU})
    s.add_job("j", chain(50))
    assert sum(s.backlog_by_needs().values()) == 1  # one task of a chain can run at a time


def measured(s: Scheduler, job_id: str, seconds: float) -> None:
    """Render what goes out before anything is measured (one task a call), each attempt taking
    ``seconds``: the job's tasks are measured from now on, nothing is in flight."""
    for batch in s.next_batches():
        assert len(batch) == 1
        for d in batch:
            s.record(d.slot, job_id, d.task.task_id, True, seconds=seconds)


def test_short_tasks_go_in_batches_of_about_the_target_once_measured() -> None:
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=2, batch_target_s=0.5, max_batch=32)
    s.add_job("j", make_tasks(400))
    measured(s, "j", 0.05)  # 4 single calls, two a slot
    batches = s.next_batches()  # 0.5 s of 50 ms tasks is 10; two batches a slot
    assert [(b[0].slot, len(b)) for b in batches] == [("a", 10), ("b", 10), ("a", 10), ("b", 10)]
    assert all(len({(d.slot, d.job_id) for d in b}) == 1 for b in batches)
    assert s.next_batches() == []
    for d in batches[1]:
        s.record(d.slot, "j", d.task.task_id, True, seconds=0.05)
    assert [(b[0].slot, len(b)) for b in s.next_batches()] == [("b", 10)]


def test_batches_are_capped_and_shrink_to_an_even_share_of_the_tail() -> None:
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=2, batch_target_s=0.5, max_batch=4)
    s.add_job("j", make_tasks(100))
    measured(s, "j", 0.001)  # 0.5 s would be 500 tasks: capped at 4
    first = s.next_batches()
    assert [len(b) for b in first] == [4, 4, 4, 4]
    for d in (d for b in first for d in b):
        s.record(d.slot, "j", d.task.task_id, True)
    log = run_to_end(s)
    assert len({d.task.task_id for d in log}) == len(log) == 80
    s2 = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=2, batch_target_s=0.5, max_batch=32)
    s2.add_job("j", make_tasks(10))
    measured(s2, "j", 0.01)  # 50 a batch by time; 6 left over 4 places: at most 2
    assert [len(b) for b in s2.next_batches()] == [2, 2, 2]


def test_a_parent_goes_alone_so_its_children_are_released_at_once() -> None:
    s = scheduler_with({"a": CPU}, in_flight_per_slot=2, batch_target_s=0.5)
    s.add_job("j", make_tasks(6) + chain(3))
    measured(s, "j", 0.01)  # t000 and t001
    # 50 tasks by time, an even share of 5 ready over 2 places is 3; the parent s0 goes alone,
    # once the slot has fewer tasks in flight than its bound for single calls.
    assert [[d.task.task_id for d in b] for b in s.next_batches()] == [["t002", "t003", "t004"], ["t005"]]
    s.record("a", "j", "t002", True)
    assert s.next_batches() == []
    for t in ("t003", "t004"):
        s.record("a", "j", t, True)
    assert [[d.task.task_id for d in b] for b in s.next_batches()] == [["s0"]]


def test_a_batch_whose_renderer_died_is_requeued_uncounted_and_its_tasks_go_alone() -> None:
    s = scheduler_with({"a": CPU, "b": CPU}, in_flight_per_slot=1, batch_target_s=0.5)
    s.add_job("j", make_tasks(30), limits=JobLimits(max_interruptions=1))
    measured(s, "j", 0.05)
    s.next_batches()
    batch = [task_id for _, task_id in s.slot_load("a")]
    assert len(batch) == 10
    decisions = s.remove_slot("a", "renderer died", running=None, solo=batch)
    # One counted interruption would have failed them (max_interruptions=1).
    assert [d.outcome for d in decisions] == [Outcome.REQUEUED] * 10
    for _, task_id in s.slot_load("b"):
        s.record("b", "j", task_id, True, seconds=0.05)
    calls = []
    while not s.idle:  # each of them alone, however short; the others batched again
        for call in s.next_batches():
            calls.append([d.task.task_id for d in call])
            for d in call:
                s.record("b", "j", d.task.task_id, True, seconds=0.05)
    assert sorted(c[0] for c in calls if set(c) & set(batch)) == sorted(batch)
    assert all(len(c) == 1 for c in calls if set(c) & set(batch)) and [len(c) for c in calls][-1] == 8


def test_a_renderer_with_a_whole_batch_queued_waits_for_room_for_another_whole_batch() -> None:
    # Results of one batch come back one task at a time: sending what each frees would split the
    # renderer's calls into ever smaller batches (a Ray call each).
    s = scheduler_with({"a": CPU}, in_flight_per_slot=2, batch_target_s=0.5)
    s.add_job("j", make_tasks(100))
    measured(s, "j", 0.05)
    first, second = s.next_batches()
    assert (len(first), len(second)) == (10, 10)
    s.record("a", "j", first[0].task.task_id, True, seconds=0.05)
    assert s.next_batches() == []  # 19 in flight: a whole batch still waits there
    for d in first[1:]:
        s.record("a", "j", d.task.task_id, True, seconds=0.05)
    assert [len(b) for b in s.next_batches()] == [10]
