"""Dispatch decisions: which task goes to which renderer slot, when, and what a failure means.

Pure: no Ray, no I/O, an injectable clock. The controller feeds it events (slots come and go,
attempts finish) and carries out what it returns.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from farm.config import IN_FLIGHT_PER_RENDERER, RETRY_BACKOFF_BASE_S, RETRY_BACKOFF_MAX_S
from farm.task import Task


@dataclass(frozen=True)
class Dispatch:
    """Send attempt ``attempt`` of ``task`` to ``slot``."""

    task: Task
    attempt: int
    slot: str


class Outcome(StrEnum):
    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    task_id: str
    outcome: Outcome
    reason: str
    retry_in_s: float = 0.0


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts of one task: base · 2^(attempt-1), capped."""

    base_s: float = RETRY_BACKOFF_BASE_S
    max_s: float = RETRY_BACKOFF_MAX_S

    def delay(self, failed_attempt: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (failed_attempt - 1))


@dataclass(frozen=True)
class Progress:
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int


class Scheduler:
    def __init__(
        self,
        tasks: Iterable[Task],
        max_attempts: int,
        in_flight_per_slot: int = IN_FLIGHT_PER_RENDERER,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1 or in_flight_per_slot < 1:
            raise ValueError("max_attempts and in_flight_per_slot must be at least 1")
        self.max_attempts = max_attempts
        self.in_flight_per_slot = in_flight_per_slot
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._ready: deque[Task] = deque(tasks)
        self._total = len(self._ready)
        self._delayed: list[tuple[float, int, Task]] = []  # (due, tiebreak, task)
        self._tiebreak = itertools.count()
        self._attempts: dict[str, int] = {}
        self._slots: dict[str, dict[str, Task]] = {}  # slot → tasks in flight there
        self._succeeded = 0
        self._failed = 0

    # --- slots
    def add_slot(self, slot: str) -> None:
        self._slots.setdefault(slot, {})

    def remove_slot(self, slot: str) -> list[Task]:
        """Forget a slot; its in-flight tasks go back to the front of the queue. Their interrupted
        attempts do not count against the retry limit."""
        lost = list(self._slots.pop(slot, {}).values())
        for task in reversed(lost):
            self._attempts[task.task_id] -= 1
            self._ready.appendleft(task)
        return lost

    @property
    def slots(self) -> list[str]:
        return list(self._slots)

    # --- dispatch
    def next_dispatches(self) -> list[Dispatch]:
        """Fill every slot up to its in-flight bound, least-loaded slot first."""
        self._release_due()
        out: list[Dispatch] = []
        while self._ready:
            open_slots = [s for s, busy in self._slots.items() if len(busy) < self.in_flight_per_slot]
            if not open_slots:
                break
            slot = min(open_slots, key=lambda s: len(self._slots[s]))
            task = self._ready.popleft()
            attempt = self._attempts.get(task.task_id, 0) + 1
            self._attempts[task.task_id] = attempt
            self._slots[slot][task.task_id] = task
            out.append(Dispatch(task, attempt, slot))
        return out

    def _release_due(self) -> None:
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])

    def seconds_until_next_retry(self) -> float | None:
        if not self._delayed:
            return None
        return max(0.0, self._delayed[0][0] - self.clock())

    # --- results
    def record(self, slot: str, task: Task, succeeded: bool, error: str = "") -> Decision:
        self._slots.get(slot, {}).pop(task.task_id, None)
        attempt = self._attempts.get(task.task_id, 1)
        if succeeded:
            self._succeeded += 1
            return Decision(task.task_id, Outcome.DONE, "succeeded")
        if attempt < self.max_attempts:
            delay = self.backoff.delay(attempt)
            heapq.heappush(self._delayed, (self.clock() + delay, next(self._tiebreak), task))
            return Decision(task.task_id, Outcome.RETRY, error or "failed", delay)
        self._failed += 1
        return Decision(task.task_id, Outcome.FAILED, f"{attempt} attempts failed; last: {error or 'failed'}")

    # --- state
    @property
    def finished(self) -> bool:
        return not self._ready and not self._delayed and not any(self._slots.values())

    def progress(self) -> Progress:
        in_flight = sum(len(v) for v in self._slots.values())
        return Progress(self._total, self._succeeded, self._failed, in_flight,
                        len(self._ready) + len(self._delayed))
