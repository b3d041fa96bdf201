"""Dispatch decisions for every job on the cluster: which task goes to which renderer slot, when,
and what a failure, a lost renderer or a cancel means.

Pure: no Ray, no I/O, an injectable clock. The controller feeds it events (pools and slots come
and go, jobs arrive, attempts finish) and carries out what it returns.

Policy, in order:
- a job's tasks run only on slots of pools that fit them (pool name, GPU type, VRAM: farm/routing.py);
- free slots are filled cheapest pool first;
- the job with the highest priority goes first; jobs of equal priority share the slots by
  in-flight count (fewest in flight first), so a small job is never starved behind a big one;
- a failed attempt is retried after exponential backoff, up to the job's attempt limit;
- an attempt that ran out of GPU memory is retried on a pool with more VRAM than the one it ran
  on, where one is known (else like any failure);
- a task interrupted by a lost renderer goes back to the queue without spending an attempt,
  unless it has now been on ``max_interruptions`` renderers that died (a task that kills every
  renderer it touches ends failed instead of sinking the pool);
- a slot that fails ``bad_slot_limit`` attempts of a job is not given that job's tasks again;
- a task with parents (a sequence's graph) waits until every parent of it in the job has
  succeeded; a parent that fails for good blocks all its descendants (never attempted);
- short tasks go out in batches: once a job's attempts are measured, a slot is given up to
  ``batch_target_s`` of its work in one dispatch round (at most ``max_batch`` tasks), so the Ray
  calls, not the rendering, stop being the cost per task. A renderer holds ``in_flight_per_slot``
  batches. Batches shrink as the queue drains (never more than an even share of what is left per
  slot and in-flight place), so renderers finish together. A task others wait on (a sequence's
  parent), and a task whose batch was on a renderer that died, go alone: a parent's result
  releases its children at once, and a task that kills renderers is found and counted alone.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple

from farm.config import (
    BAD_SLOT_LIMIT,
    BATCH_TARGET_S,
    IN_FLIGHT_PER_RENDERER,
    MAX_BATCH,
    MAX_INTERRUPTIONS,
    RETRY_BACKOFF_BASE_S,
    RETRY_BACKOFF_MAX_S,
)
from farm.routing import fitting_pools
from farm.task import Pool, Requirements, Task


@dataclass(frozen=True)
class Dispatch:
    """Send attempt ``attempt`` of ``task`` (of ``job_id``) to ``slot``."""

    job_id: str
    task: Task
    attempt: int
    slot: str


class Outcome(StrEnum):
    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"
    REQUEUED = "requeued"  # interrupted: back in the queue, no attempt spent
    DROPPED = "dropped"  # its job was cancelled
    BLOCKED = "blocked"  # a task it depends on failed for good: it is never attempted


@dataclass(frozen=True)
class Decision:
    job_id: str
    task_id: str
    outcome: Outcome
    reason: str
    retry_in_s: float = 0.0
    task: Task | None = None
    attempt: int = 0  # the task's last attempt number (for decisions made without a result)

    @property
    def final(self) -> bool:
        return self.outcome in (Outcome.DONE, Outcome.FAILED, Outcome.DROPPED, Outcome.BLOCKED)


class Demand(NamedTuple):
    """Queued work of one job, as the fleet sizes renderers for it."""

    model: str  # the model identity its tasks need; "" = any renderer
    priority: int
    needs: list[Requirements]  # the requirement groups of its queued tasks
    queued: int  # tasks ready to dispatch (not waiting out a retry backoff)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts of one task: base · 2^(attempt-1), capped."""

    base_s: float = RETRY_BACKOFF_BASE_S
    max_s: float = RETRY_BACKOFF_MAX_S

    def delay(self, failed_attempt: int) -> float:
        return min(self.max_s, self.base_s * 2.0 ** (failed_attempt - 1))


@dataclass(frozen=True)
class JobLimits:
    max_attempts: int = 3
    max_interruptions: int = MAX_INTERRUPTIONS
    bad_slot_limit: int = BAD_SLOT_LIMIT


@dataclass(frozen=True)
class Progress:
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int
    cancelled: bool = False
    waiting: int = 0  # for parents to succeed
    blocked: int = 0  # of ``failed``: never attempted, a parent failed

    @property
    def finished(self) -> bool:
        return self.in_flight == 0 and (self.cancelled or (self.queued == 0 and self.waiting == 0))


@dataclass
class _Graph:
    """A job's tasks that wait for others to succeed (a sequence's graph)."""

    waiting: dict[str, Task] = field(default_factory=dict)  # task id → a task whose parents have not all succeeded
    open_parents: Counter[str] = field(default_factory=Counter)  # task id → its parents not succeeded yet
    children: dict[str, list[str]] = field(default_factory=dict)  # task id → tasks waiting on it

    def wait(self, task: Task, parents: list[str]) -> None:
        self.waiting[task.task_id] = task
        self.open_parents[task.task_id] = len(parents)
        for parent in parents:
            self.children.setdefault(parent, []).append(task.task_id)

    def released_by(self, task_id: str) -> list[Task]:
        """``task_id`` succeeded: the children whose parents have now all succeeded."""
        ready = []
        for child in self.children.pop(task_id, ()):
            self.open_parents[child] -= 1
            if self.open_parents[child] == 0 and child in self.waiting:
                del self.open_parents[child]
                ready.append(self.waiting.pop(child))
        return ready

    def blocked_by(self, task_id: str) -> list[tuple[str, Task]]:
        """``task_id`` failed for good: every task waiting on it, directly or not, with the parent
        it was waiting on; they leave the graph."""
        out, stack = [], [(task_id, child) for child in self.children.pop(task_id, ())]
        while stack:
            parent, child = stack.pop()
            task = self.waiting.pop(child, None)
            if task is None:  # blocked already, through another parent
                continue
            self.open_parents.pop(child, None)
            out.append((parent, task))
            stack.extend((child, grandchild) for grandchild in self.children.pop(child, ()))
        return out


@dataclass
class _Job:
    job_id: str
    priority: int
    seq: int
    limits: JobLimits
    total: int
    model: str = ""  # model identity its tasks need; "" = any renderer
    ready: dict[Requirements, deque[Task]] = field(default_factory=dict)
    delayed: list[tuple[float, int, Task]] = field(default_factory=list)  # a heap: (due, tiebreak, task)
    attempts: Counter[str] = field(default_factory=Counter)
    interruptions: Counter[str] = field(default_factory=Counter)
    slot_failures: Counter[str] = field(default_factory=Counter)
    banned_slots: set[str] = field(default_factory=set)
    last_error: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0
    succeeded: int = 0
    failed: int = 0
    blocked: int = 0
    cancelled: bool = False
    graph: _Graph = field(default_factory=lambda: _Graph())
    task_s: float = 0.0  # a moving average of its attempts' seconds on a renderer; 0: none measured yet
    solo: set[str] = field(default_factory=set)  # tasks that go alone: their batch's renderer died

    def queued(self) -> int:
        return sum(len(q) for q in self.ready.values()) + len(self.delayed)

    def ready_count(self) -> int:
        return sum(len(q) for q in self.ready.values())

    def alone(self, task_id: str) -> bool:
        """Whether ``task_id`` goes in a batch of its own (see the module's policy)."""
        return task_id in self.solo or task_id in self.graph.children

    def push(self, task: Task, front: bool = False) -> None:
        queue = self.ready.setdefault(task.needs, deque())
        if front:
            queue.appendleft(task)
        else:
            queue.append(task)


@dataclass(frozen=True)
class Batching:
    """How many of a job's tasks one call to a renderer carries (see the module's policy)."""

    target_s: float = BATCH_TARGET_S  # about this much measured work a call
    max_batch: int = MAX_BATCH
    in_flight_per_slot: int = IN_FLIGHT_PER_RENDERER

    def share(self, ready: int, slots: int) -> int:
        """The most tasks one batch may hold now: an even share of the ``ready`` tasks over every
        slot's in-flight places, so no renderer is left holding the tail while others are idle."""
        return max(1, math.ceil(ready / max(1, slots * self.in_flight_per_slot)))

    def size(self, task_s: float, share: int) -> int:
        """Tasks of a job whose attempts take ``task_s`` (0: not measured yet) one batch holds."""
        if task_s <= 0:
            return 1
        return max(1, min(self.max_batch, share, int(self.target_s / task_s)))


@dataclass
class _Slot:
    pool: str
    model: str = ""  # model identity the renderer holds; "" = any
    in_flight: dict[tuple[str, str], Task] = field(default_factory=dict)  # (job_id, task_id) → task


class Scheduler:
    def __init__(
        self,
        in_flight_per_slot: int = IN_FLIGHT_PER_RENDERER,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_target_s: float = BATCH_TARGET_S,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if in_flight_per_slot < 1 or max_batch < 1:
            raise ValueError("in_flight_per_slot and max_batch must be at least 1")
        self.in_flight_per_slot = in_flight_per_slot
        self.batching = Batching(batch_target_s, max_batch, in_flight_per_slot)
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self._slots: dict[str, _Slot] = {}
        self._jobs: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._tiebreak = itertools.count()
        self._due_at = math.inf  # no delayed retry is due before this
        self.decisions: list[Decision] = []

    # --- pools and slots
    def add_pool(self, pool: Pool) -> None:
        self.pools[pool.name] = pool

    def routes(self, needs: Requirements) -> list[Pool]:
        """Known pools that fit, cheapest first (farm/routing.py)."""
        return fitting_pools(self.pools.values(), needs)

    def add_slot(self, slot: str, pool: str, model: str = "") -> None:
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r}")
        self._slots.setdefault(slot, _Slot(pool, model))

    def remove_slot(
        self, slot: str, reason: str = "renderer lost", running: str | None = None, solo: Iterable[str] = ()
    ) -> list[Decision]:
        """A slot's renderer died: its tasks go back to their queues as interrupted. The task that
        was running (``running``; the others only waited behind it) is counted: once it has been
        on ``max_interruptions`` renderers that died, it fails instead of going back. Tasks in
        ``solo`` (a batch was running: which of them killed the renderer is not known) go back
        uncounted, to be sent alone from now on."""
        solo = set(solo)
        lost = self._slots.pop(slot, None)
        if lost is None:
            return []
        decisions = []
        for (job_id, task_id), task in lost.in_flight.items():
            job = self._jobs[job_id]
            job.in_flight -= 1
            job.attempts[task_id] -= 1  # an interrupted attempt is not spent
            if job.cancelled:
                decisions.append(Decision(job_id, task_id, Outcome.DROPPED, "job cancelled", task=task))
                continue
            if task_id == running:
                job.interruptions[task_id] += 1
            if job.interruptions[task_id] >= job.limits.max_interruptions:
                job.failed += 1
                decisions.append(
                    Decision(
                        job_id,
                        task_id,
                        Outcome.FAILED,
                        f"{job.interruptions[task_id]} renderers died running it; last: {reason}",
                        task=task,
                    )
                )
                self._block_descendants(task_id)
            else:
                if task_id in solo:
                    job.solo.add(task_id)
                job.push(task, front=True)
                decisions.append(Decision(job_id, task_id, Outcome.REQUEUED, reason, task=task))
        return decisions

    def slot_load(self, slot: str) -> list[tuple[str, str]]:
        s = self._slots.get(slot)
        return list(s.in_flight) if s else []

    # --- jobs
    def add_job(
        self,
        job_id: str,
        tasks: Iterable[Task],
        priority: int = 0,
        limits: JobLimits | None = None,
        model: str = "",
        elsewhere: Iterable[str] = (),
    ) -> None:
        """``elsewhere``: tasks another job renders; a task of this one waits for those among its
        parents as for its own. A parent in neither was done before the job came."""
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} already scheduled")
        job = _Job(job_id, priority, next(self._seq), limits or JobLimits(), 0, model)
        tasks = list(tasks)
        pending = {t.task_id for t in tasks} | set(elsewhere)
        for task in tasks:
            job.total += 1
            parents = [p for p in task.parents if p in pending]
            if not parents:
                job.push(task)
                continue
            job.graph.wait(task, parents)
        self._jobs[job_id] = job

    def cancel(self, job_id: str) -> list[tuple[str, str]]:
        """Stop dispatching a job. Returns its in-flight (slot, task_id) pairs for the caller to stop."""
        job = self._jobs[job_id]
        job.cancelled = True
        unfinished = [t.task_id for q in job.ready.values() for t in q] + [t.task_id for _, _, t in job.delayed]
        unfinished += list(job.graph.waiting)
        job.ready.clear()
        job.delayed.clear()
        job.graph.waiting.clear()
        for task_id in unfinished:  # another job waiting on one of them would wait forever
            self._block_descendants(task_id)
        return [(name, task_id) for name, s in self._slots.items() for (j, task_id) in s.in_flight if j == job_id]

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def next_dispatches(self) -> list[Dispatch]:
        """``next_batches``, one dispatch after another."""
        return [d for batch in self.next_batches() for d in batch]

    def next_batches(self) -> list[list[Dispatch]]:
        """Fill free slots: cheapest pool first, least-loaded slot first, one batch (one job's
        tasks, one task until the job's attempts are measured) per slot per round so work spreads
        over every renderer. Each batch is one call to its slot's renderer."""
        self._release_due()
        self._fail_jobs_with_only_banned_slots()
        out: list[list[Dispatch]] = []
        ready = sum(j.ready_count() for j in self._jobs.values() if not j.cancelled)
        share = self.batching.share(ready, len(self._slots))
        free = list(self._slots)
        while free:
            free.sort(
                key=lambda name: (
                    self.pools[self._slots[name].pool].cost_per_hour,
                    len(self._slots[name].in_flight),
                    name,
                )
            )
            took = []
            for name in free:
                batch = self._take(name, share)
                if batch:
                    out.append(batch)
                    took.append(name)
            free = took  # a slot given nothing this round gets nothing the next (queues only shrink meanwhile)
        return out

    def _take(self, slot_name: str, share: int) -> list[Dispatch]:
        slot = self._slots[slot_name]
        pool = self.pools[slot.pool]
        candidates = [
            j
            for j in self._jobs.values()
            if not j.cancelled
            and slot_name not in j.banned_slots
            and (not slot.model or not j.model or slot.model == j.model)
            and any(q for needs, q in j.ready.items() if pool.fits(needs))
        ]
        if not candidates:
            return []
        job = min(candidates, key=lambda j: (-j.priority, j.in_flight, j.seq))
        queue = next(q for needs, q in job.ready.items() if q and pool.fits(needs))
        size = 1 if job.alone(queue[0].task_id) else self.batching.size(job.task_s, share)
        room = self.in_flight_per_slot * size - len(slot.in_flight)
        if room < size and len(slot.in_flight) >= size:  # a whole batch waits there: wait for room for another
            return []
        batch: list[Dispatch] = []
        for _ in range(min(size, room)):
            if not queue or (batch and job.alone(queue[0].task_id)):
                break
            task = queue.popleft()
            job.attempts[task.task_id] += 1
            job.in_flight += 1
            slot.in_flight[(job.job_id, task.task_id)] = task
            batch.append(Dispatch(job.job_id, task, job.attempts[task.task_id], slot_name))
        return batch

    def _fail_jobs_with_only_banned_slots(self) -> None:
        for job in self._jobs.values():
            if job.cancelled or not job.banned_slots or not job.queued() or job.in_flight:
                continue
            fitting = [
                n
                for n, s in self._slots.items()
                if any(self.pools[s.pool].fits(nd) for nd in job.ready)
                and (not s.model or not job.model or s.model == job.model)
            ]
            if fitting and all(n in job.banned_slots for n in fitting):
                for decision in _give_up_queued(job):
                    self.decisions.append(decision)
                    self._block_descendants(decision.task_id)

    def drain_decisions(self) -> list[Decision]:
        """Decisions the scheduler took on its own (not in answer to an event)."""
        out, self.decisions = self.decisions, []
        return out

    def _release_due(self) -> None:
        """Retries whose backoff is over go back to their queues (nothing to look at before the
        earliest is due)."""
        now = self.clock()
        if now < self._due_at:
            return
        for job in self._jobs.values():
            while job.delayed and job.delayed[0][0] <= now:
                job.push(heapq.heappop(job.delayed)[2])
        self._due_at = min((job.delayed[0][0] for job in self._jobs.values() if job.delayed), default=math.inf)

    def record(
        self,
        slot: str,
        job_id: str,
        task_id: str,
        succeeded: bool,
        error: str = "",
        oom: bool = False,
        seconds: float = 0.0,
    ) -> Decision:
        """An attempt finished on ``slot`` (a failure includes a timeout; ``oom``: it ran out of GPU
        memory, and its retry needs more VRAM than the slot's pool has, where a pool has it).
        ``seconds``: what a successful attempt took its renderer (sizes the job's batches)."""
        job = self._jobs[job_id]
        s = self._slots.get(slot)
        task = s.in_flight.pop((job_id, task_id), None) if s else None
        if task is None:  # already written off with its slot
            return Decision(job_id, task_id, Outcome.DROPPED, "slot already removed")
        job.in_flight -= 1
        attempt = job.attempts[task_id]
        if succeeded:
            job.succeeded += 1
            if seconds > 0:  # weighs the last ~10 attempts: a job's clips are alike, a renderer's speed may drift
                job.task_s = seconds if job.task_s <= 0 else 0.9 * job.task_s + 0.1 * seconds
            self._release_children(task_id)
            return Decision(job_id, task_id, Outcome.DONE, "succeeded")
        if job.cancelled:
            return Decision(job_id, task_id, Outcome.DROPPED, "job cancelled")
        job.last_error[task_id] = error
        job.slot_failures[slot] += 1
        if job.slot_failures[slot] >= job.limits.bad_slot_limit:
            job.banned_slots.add(slot)
        if attempt < job.limits.max_attempts:
            if oom and s is not None:
                task = _with_more_vram(task, self.pools.get(s.pool), self.pools.values())
            delay = self.backoff.delay(attempt)
            due = self.clock() + delay
            heapq.heappush(job.delayed, (due, next(self._tiebreak), task))
            self._due_at = min(self._due_at, due)
            return Decision(job_id, task_id, Outcome.RETRY, error or "failed", delay)
        job.failed += 1
        self._block_descendants(task_id)
        return Decision(job_id, task_id, Outcome.FAILED, f"{attempt} attempts failed; last: {error or 'failed'}")

    def _release_children(self, task_id: str) -> None:
        _release_children(self._jobs.values(), task_id)

    def _block_descendants(self, task_id: str) -> None:
        self.decisions.extend(_block_descendants(self._jobs.values(), task_id))

    # --- state
    def progress(self, job_id: str) -> Progress:
        j = self._jobs[job_id]
        return Progress(
            j.total, j.succeeded, j.failed, j.in_flight, j.queued(), j.cancelled, len(j.graph.waiting), j.blocked
        )

    def banned_slots(self, job_id: str) -> set[str]:
        return set(self._jobs[job_id].banned_slots)

    def waiting_without_pool(self, job_id: str) -> int:
        """Queued tasks that no current pool can take (they wait for one to join)."""
        job = self._jobs[job_id]
        return sum(len(q) for needs, q in job.ready.items() if not any(p.fits(needs) for p in self.pools.values()))

    def demand(self) -> list[Demand]:
        """Every job with queued work, highest priority first: what renderers the fleet should
        have running."""
        out = []
        for j in sorted(self._jobs.values(), key=lambda j: (-j.priority, j.seq)):
            queued = sum(len(q) for q in j.ready.values())
            if queued and not j.cancelled:
                out.append(Demand(j.model, j.priority, [n for n, q in j.ready.items() if q], queued))
        return out

    def backlog_by_needs(self, in_flight: bool = True) -> Counter[Requirements]:
        """Tasks queued (also waiting out a retry backoff) and, with ``in_flight``, running, by what
        they need: the work the pools should be sized for."""
        return _backlog(self._jobs, self._slots.values() if in_flight else ())

    @property
    def idle(self) -> bool:
        return all(self.progress(j).finished for j in self._jobs)


def _with_more_vram(task: Task, pool: Pool | None, pools: Iterable[Pool]) -> Task:
    """``task`` needing more VRAM than ``pool`` has, when one of ``pools`` offers that; else
    unchanged (it is retried where it was: the out-of-memory error may not come back)."""
    if pool is None or pool.vram_gb is None:
        return task
    more = replace(task.needs, min_vram_gb=math.nextafter(pool.vram_gb, math.inf))
    return replace(task, needs=more) if fitting_pools(pools, more) else task


def _backlog(jobs: dict[str, _Job], slots: Iterable[_Slot]) -> Counter[Requirements]:
    """Tasks queued (also waiting out a retry backoff) and running on ``slots``, by what they
    need, of the jobs not cancelled."""
    backlog: Counter[Requirements] = Counter()
    for job in jobs.values():
        if job.cancelled:
            continue
        for needs, queue in job.ready.items():
            backlog[needs] += len(queue)
        for _, _, task in job.delayed:
            backlog[task.needs] += 1
    for slot in slots:
        for (job_id, _), task in slot.in_flight.items():
            if not jobs[job_id].cancelled:
                backlog[task.needs] += 1
    return +backlog


def _give_up_queued(job: _Job) -> list[Decision]:
    """Every renderer that fits ``job`` was taken out of it: its queued tasks fail."""
    out = []
    for task in (task for queue in job.ready.values() for task in queue):
        job.failed += 1
        last = job.last_error.get(task.task_id) or next(iter(job.last_error.values()), "")
        why = f"every renderer that fits was taken out of this job after repeated failures; last: {last}"
        out.append(
            Decision(job.job_id, task.task_id, Outcome.FAILED, why, task=task, attempt=job.attempts[task.task_id])
        )
    job.ready.clear()
    return out


def _release_children(jobs: Iterable[_Job], task_id: str) -> None:
    """A task succeeded: in every job (a job may wait on a task another job renders), each child
    whose parents have now all succeeded is ready."""
    for job in jobs:
        if not job.cancelled:
            for task in job.graph.released_by(task_id):
                job.push(task)


def _block_descendants(jobs: Iterable[_Job], task_id: str) -> list[Decision]:
    """A task failed for good (or will never run): every task waiting on it, directly or not, in
    every job, is blocked; the decisions say so."""
    out = []
    for job in jobs:
        for parent, task in job.graph.blocked_by(task_id):
            job.failed += 1
            job.blocked += 1
            why = f"blocked: {parent} failed" if parent == task_id else f"blocked: {task_id} failed (via {parent})"
            out.append(Decision(job.job_id, task.task_id, Outcome.BLOCKED, why, task=task))
    return out
