"""The pure scheduler: bounded in-flight work, retries with backoff, requeue on lost renderers."""

from __future__ import annotations

from farm.scheduler import Backoff, Outcome, Scheduler
from farm.task import ModelRef, RenderSettings, Task

MODEL = ModelRef("tiny", "builtin", "/m", "builtin:test", "WanPipeline")
SETTINGS = RenderSettings(64, 64, 9, 8, 4, 5.0)


def make_tasks(n: int) -> list[Task]:
    return [Task(f"t{i:03d}", f"prompt {i}", i, MODEL, SETTINGS) for i in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_never_more_than_the_bound_in_flight_per_slot_and_every_slot_kept_busy():
    s = Scheduler(make_tasks(20), max_attempts=1, in_flight_per_slot=2)
    for slot in ("a", "b", "c"):
        s.add_slot(slot)
    first = s.next_dispatches()
    assert len(first) == 6
    assert {slot: sum(d.slot == slot for d in first) for slot in "abc"} == {"a": 2, "b": 2, "c": 2}
    assert s.next_dispatches() == []  # full: nothing more until something finishes
    s.record("b", first[1].task, succeeded=True)
    again = s.next_dispatches()
    assert [d.slot for d in again] == ["b"]
    assert s.progress().in_flight == 6 and s.progress().queued == 13


def test_all_tasks_dispatched_once_when_all_succeed():
    s = Scheduler(make_tasks(7), max_attempts=3)
    s.add_slot("a")
    seen = []
    while not s.finished:
        for d in s.next_dispatches():
            seen.append((d.task.task_id, d.attempt))
            s.record(d.slot, d.task, succeeded=True)
    assert sorted(seen) == [(f"t{i:03d}", 1) for i in range(7)]
    assert s.progress().succeeded == 7


def test_failures_retry_after_backoff_then_fail_final():
    clock = FakeClock()
    s = Scheduler(make_tasks(1), max_attempts=3, backoff=Backoff(base_s=1.0, max_s=10.0), clock=clock)
    s.add_slot("a")
    (d,) = s.next_dispatches()
    decision = s.record("a", d.task, succeeded=False, error="boom")
    assert decision.outcome is Outcome.RETRY and decision.retry_in_s == 1.0
    assert s.next_dispatches() == [] and not s.finished  # waiting out the backoff
    clock.now = 1.0
    (d2,) = s.next_dispatches()
    assert d2.attempt == 2
    assert s.record("a", d2.task, succeeded=False, error="boom").retry_in_s == 2.0
    clock.now = 3.0
    (d3,) = s.next_dispatches()
    final = s.record("a", d3.task, succeeded=False, error="boom")
    assert final.outcome is Outcome.FAILED and "3 attempts failed; last: boom" in final.reason
    assert s.finished and s.progress().failed == 1


def test_a_lost_slot_requeues_its_tasks_without_spending_attempts():
    s = Scheduler(make_tasks(3), max_attempts=1)
    s.add_slot("a")
    s.add_slot("b")
    dispatched = s.next_dispatches()
    on_a = [d.task.task_id for d in dispatched if d.slot == "a"]
    lost = s.remove_slot("a")
    assert sorted(t.task_id for t in lost) == sorted(on_a)
    redo = s.next_dispatches()
    assert {d.slot for d in redo} == {"b"}
    assert all(d.attempt == 1 for d in redo)


def test_backoff_is_capped():
    assert [Backoff(0.5, 3.0).delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
