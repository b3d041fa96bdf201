"""The renderer fleet: which renderers run in which pool, for which model, and what each is doing.

Pure: no Ray, no I/O. Renderers are started through an injected factory ((model, pool capacity)
→ handle: ``farm.cluster.start_renderer`` in the controller, a fake in tests), time comes from an
injected clock, and renderer handles and result references are opaque values. The fleet returns
decisions; the controller carries them out against Ray (it starts what ``StartRenderer`` says
through ``start``, watches the new renderer's ``info()``, kills what ``RetireRenderer`` says and
hands its queue back to the scheduler, adds a ``RendererReady`` slot to the scheduler).

Policy:
- renderers are started for jobs with queued work, highest priority first: a job's model gets
  another renderer while it has fewer (loading or loaded, in pools that fit the tasks) than the
  job has tasks ready to dispatch, one more per job and turn (a model load is slow and heavy: the
  next turn sees whether still more are needed);
- a renderer goes to the cheapest pool that fits any of the job's queued tasks (farm/routing.py)
  and has a free slot; a pool has as many slots as its alive nodes offer;
- a full pool frees a slot only by retiring an idle, loaded renderer of a model with no queued
  work: a busy or loading renderer is never stopped for another model, and a model that still
  has work keeps its renderers (else two models would take the slot from each other, paying a
  model load each time);
- renderers stay resident across jobs; one that dies, times out or is retired is forgotten, and
  if its model still has work the next ``scale`` starts a replacement the same way;
- a renderer whose model does not load is retired and its model's jobs fail: every renderer of
  that model would fail the same way;
- when a pool is scaled down, only whole nodes whose renderers are all idle are released
  (``scaling.renderers_to_release``): the autoscaler removes a node only when nothing holds it;
- each renderer has a queue of calls sent to it, in order, each a batch of one or more attempts
  (farm/scheduler.py); the head batch is the one running, and its running time counts from when
  it became the head: it may run a job's timeout for each attempt in it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from farm.metrics import RENDERER_STATES
from farm.routing import pools_fitting_any
from farm.scaling import renderers_to_release
from farm.scheduler import Demand, Dispatch
from farm.task import ModelRef

if TYPE_CHECKING:  # farm.cluster and farm.render import the model stack; the fleet only needs their shapes
    from farm.cluster import PoolCapacity
    from farm.render import RendererInfo

RendererFactory = Callable[[ModelRef, "PoolCapacity"], object]  # → a renderer handle, at once (it loads behind)


@dataclass(frozen=True)
class StartRenderer:
    """Start a renderer of ``model`` in ``pool`` as ``slot`` (carried out by ``Fleet.start``)."""

    slot: str
    pool: str
    model: ModelRef
    reason: str


@dataclass(frozen=True)
class RetireRenderer:
    """Stop the renderer in ``slot``; whatever it had queued goes back to the scheduler."""

    slot: str
    reason: str


@dataclass(frozen=True)
class RendererReady:
    """The renderer in ``slot`` has its model loaded: the scheduler may send it work."""

    slot: str
    pool: str
    model: ModelRef
    reason: str = "model loaded"


@dataclass(frozen=True)
class FailModelJobs:
    """``model`` cannot be loaded: fail the jobs that need it."""

    model: ModelRef
    reason: str


Batch = tuple[Dispatch, ...]  # the attempts of one call to a renderer, rendered in this order


@dataclass(frozen=True)
class TimedOut:
    """The batch running on ``slot`` (``ref`` resolves to its results) ran past its job's timeout
    (for each attempt in it): the renderer is replaced (one stuck in a task may never come back),
    and the attempt it was stuck in counts as failed."""

    slot: str
    ref: Hashable
    batch: Batch
    reason: str


FleetDecision = StartRenderer | RetireRenderer | RendererReady | FailModelJobs | TimedOut


@dataclass
class RendererRecord:
    """One renderer actor and what the fleet knows of it."""

    slot: str
    pool: str
    model: ModelRef
    handle: Any  # opaque here: a Ray actor handle in the controller, a fake in tests
    ready: bool = False  # its model is loaded
    queue: deque[tuple[Hashable, Batch]] = field(default_factory=deque)  # (results ref, batch); head runs
    head_started: float = 0.0
    loads: int = 0
    load_s: float = 0.0
    node_id: str = ""
    actor_id: str = ""
    pid: int = 0

    @property
    def idle(self) -> bool:
        return self.ready and not self.queue

    @property
    def state(self) -> str:
        """One of RENDERER_STATES."""
        return "loading" if not self.ready else "busy" if self.queue else "idle"


def pool_of(slot: str) -> str:
    """The pool a slot belongs to, from its name (also once its renderer is gone)."""
    return slot.rsplit("-", 1)[0]  # slots are named <pool>-<random hex>


class Fleet:
    """The renderers of every pool (see the module's policy). ``factory`` starts one renderer for
    (model, pool capacity) and returns its handle at once; ``clock`` times running attempts."""

    def __init__(self, factory: RendererFactory, clock: Callable[[], float] = time.monotonic) -> None:
        self.factory = factory
        self.clock = clock
        self.renderers: dict[str, RendererRecord] = {}
        self.capacity: dict[str, PoolCapacity] = {}  # pool name → what its alive nodes offer
        self.in_flight: dict[Hashable, tuple[str, Batch]] = {}  # results ref → (slot, batch)
        self.pending_starts: dict[Hashable, str] = {}  # ref that resolves once loaded → slot

    # ------------------------------------------------------------------ pools
    def set_capacity(self, capacities: Iterable[PoolCapacity]) -> None:
        """The pools the cluster's alive nodes offer now. Renderers of a pool that went away stay
        until Ray reports them dead (their node may only be slow to answer)."""
        self.capacity = {c.pool.name: c for c in capacities}

    # ------------------------------------------------------------------ starting and retiring
    def scale(self, demand: Iterable[Demand], models: Mapping[str, ModelRef]) -> list[FleetDecision]:
        """The renderers to start (and the idle ones to retire to make room) for the queued work,
        in the order to carry them out. ``models``: model identity → ModelRef of the running jobs."""
        demand = list(demand)
        wanted = {d.model for d in demand}
        serving = Counter((r.model.identity, r.pool) for r in self.renderers.values())
        planned: Counter[str] = Counter()  # starts decided in this call, per pool
        retiring: set[str] = set()
        pools = [c.pool for c in self.capacity.values()]
        decisions: list[FleetDecision] = []
        for d in demand:
            model = models.get(d.model)
            fitting = pools_fitting_any(pools, d.needs)
            # Only renderers in pools that fit the work serve it: a task sent on to a pool with more
            # VRAM after running out of memory is not served by the smaller pool's renderers.
            able = sum(serving[d.model, p.name] for p in fitting)
            if model is None or able >= d.queued:
                continue
            for pool in fitting:
                members = [r for r in self.renderers.values() if r.pool == pool.name and r.slot not in retiring]
                if len(members) + planned[pool.name] >= self.capacity[pool.name].slots:
                    spare = next((r for r in members if r.idle and r.model.identity not in wanted), None)
                    if spare is None:
                        continue
                    retiring.add(spare.slot)
                    decisions.append(
                        RetireRenderer(
                            spare.slot,
                            f"another model needs the slot ({model.spec}); {spare.model.spec} has no queued work",
                        )
                    )
                decisions.append(
                    StartRenderer(
                        f"{pool.name}-{uuid.uuid4().hex[:6]}",
                        pool.name,
                        model,
                        f"{d.queued} tasks queued for {model.spec} on {able} renderers that fit them; "
                        f"{pool.name} is the cheapest fitting pool with a free slot",
                    )
                )
                serving[d.model, pool.name] += 1
                planned[pool.name] += 1
                break
        return decisions

    def start(self, decision: StartRenderer) -> Any:
        """Start the renderer a ``StartRenderer`` asks for; returns its handle (loading)."""
        handle = self.factory(decision.model, self.capacity[decision.pool])
        self.renderers[decision.slot] = RendererRecord(decision.slot, decision.pool, decision.model, handle)
        return handle

    def watch_start(self, ref: Hashable, slot: str) -> None:
        """``ref`` resolves (to a RendererInfo) once ``slot``'s renderer has loaded its model."""
        self.pending_starts[ref] = slot

    def started_slot(self, ref: Hashable) -> str | None:
        """The slot a resolved start ref was for (forgotten now); None if not a start ref."""
        return self.pending_starts.pop(ref, None)

    def loaded(self, slot: str, info: RendererInfo) -> list[FleetDecision]:
        """A renderer answered after loading (or failing to load) its model."""
        renderer = self.renderers.get(slot)
        if renderer is None:  # retired while it loaded
            return []
        if info.load_error:
            return [
                FailModelJobs(renderer.model, f"model did not load: {info.load_error}"),
                RetireRenderer(slot, "model did not load"),
            ]
        renderer.ready, renderer.loads, renderer.load_s = True, info.pipeline_loads, info.load_seconds
        renderer.node_id, renderer.actor_id, renderer.pid = info.node_id, info.actor_id, info.pid
        return [RendererReady(slot, renderer.pool, renderer.model)]

    def remove(self, slot: str) -> RendererRecord | None:
        """Forget a renderer that died or is being retired, with its in-flight and start refs.
        Returns it (its queue says what it had: the head was running) or None if already gone."""
        renderer = self.renderers.pop(slot, None)
        for ref, _ in renderer.queue if renderer else ():
            self.in_flight.pop(ref, None)
        for ref in [ref for ref, s in self.pending_starts.items() if s == slot]:
            del self.pending_starts[ref]
        return renderer

    def release_idle(self, pool: str, keep: int) -> list[RetireRenderer]:
        """A resident renderer holds its node's farm_pool slot, so Ray's autoscaler never sees the
        node idle: once ``pool`` is scaled down to ``keep`` slots, retire the idle renderers of
        whole nodes beyond that."""
        members = [(r.slot, r.node_id, r.idle) for r in self.renderers.values() if r.pool == pool]
        return [
            RetireRenderer(slot, "pool scaled down: its node may go") for slot in renderers_to_release(members, keep)
        ]

    # ------------------------------------------------------------------ work on renderers
    def sent(self, ref: Hashable, batch: Batch) -> None:
        """A batch of attempts (one slot's) was sent to its renderer; ``ref`` resolves to its results."""
        slot = batch[0].slot
        renderer = self.renderers[slot]
        if not renderer.queue:
            renderer.head_started = self.clock()
        renderer.queue.append((ref, batch))
        self.in_flight[ref] = (slot, batch)

    def collected(self, ref: Hashable) -> tuple[str, Batch]:
        """A batch's results are in (or it is written off): take it off its renderer's queue.
        The next batch in the queue starts running now."""
        slot, batch = self.in_flight.pop(ref)
        renderer = self.renderers.get(slot)
        if renderer is not None:
            if renderer.queue and renderer.queue[0][0] == ref:
                renderer.queue.popleft()
                renderer.head_started = self.clock()
            else:  # results can come in out of order
                renderer.queue = deque(item for item in renderer.queue if item[0] != ref)
        return slot, batch

    def heads(self) -> list[tuple[RendererRecord, float]]:
        """Each renderer that is rendering, and how long its running attempt has run."""
        now = self.clock()
        return [(r, now - r.head_started) for r in self.renderers.values() if r.queue]

    def overdue(self, timeouts: Mapping[str, float], stop: Iterable[str] = ()) -> list[FleetDecision]:
        """Renderers to stop now: those running an attempt of a job in ``stop`` (cancelled, its
        grace over), and those whose running batch has run past its job's timeout for each attempt
        in it (``timeouts``: job id → seconds). Batches only waiting in a queue are not timed."""
        now, stop = self.clock(), set(stop)
        out: list[FleetDecision] = []
        for r in list(self.renderers.values()):
            if not r.queue:
                continue
            ref, batch = r.queue[0]
            job_id = batch[0].job_id  # a batch is one job's
            if job_id in stop:
                out.append(RetireRenderer(r.slot, "job cancelled"))
            elif job_id in timeouts and now - r.head_started > timeouts[job_id] * len(batch):
                out.append(TimedOut(r.slot, ref, batch, f"timed out after {timeouts[job_id]:g}s on renderer {r.slot}"))
        return out

    def waiting(self) -> list[Hashable]:
        """Every ref the fleet waits on: attempt results and renderer starts."""
        return [*self.in_flight, *self.pending_starts]

    # ------------------------------------------------------------------ views
    def ready_count(self, model_identity: str) -> int:
        return sum(1 for r in self.renderers.values() if r.ready and r.model.identity == model_identity)

    def states(self, pool: str) -> dict[str, int]:
        """RENDERER_STATES → renderers of ``pool`` in that state."""
        counts = dict.fromkeys(RENDERER_STATES, 0)
        for r in self.renderers.values():
            if r.pool == pool:
                counts[r.state] += 1
        return counts

    def running_by_pool(self) -> Counter[str]:
        """Attempts running or queued on each pool's renderers."""
        return Counter(r.pool for r in self.renderers.values() for _, batch in r.queue for _ in batch)

    def busy_pools(self) -> set[str]:
        """Pools with a renderer rendering or loading: not idle, whatever the backlog says."""
        return {r.pool for r in self.renderers.values() if not r.idle}

    def pools(self) -> list[dict[str, Any]]:
        """Each pool with alive nodes, and its renderers (``farm pools``)."""
        return [
            {
                "pool": name,
                "gpu_type": cap.pool.gpu_type,
                "vram_gb": cap.pool.vram_gb,
                "cost_per_hour": cap.pool.cost_per_hour,
                "slots": cap.slots,
                "nodes": list(cap.nodes),
                "renderers": [
                    {
                        "slot": r.slot,
                        "model": r.model.spec,
                        "ready": r.ready,
                        "node_id": r.node_id,
                        "busy": [f"{d.job_id}/{d.task.task_id}" for _, batch in r.queue for d in batch],
                    }
                    for r in self.renderers.values()
                    if r.pool == name
                ],
            }
            for name, cap in self.capacity.items()
        ]

    def stats(self) -> list[dict[str, Any]]:
        return [
            {
                "slot": r.slot,
                "pool": r.pool,
                "model": r.model.spec,
                "loads": r.loads,
                "load_s": r.load_s,
                "ready": r.ready,
                "node_id": r.node_id,
                "actor_id": r.actor_id,
                "pid": r.pid,
            }
            for r in self.renderers.values()
        ]
