"""Scaling decisions: how many worker nodes each pool should have for the work waiting for it,
and what finishing that work by a deadline takes and costs.

Pure: no Ray, no I/O, no clock (the caller says what time it is). The controller keeps an
``Autoscaling`` (what it measured and asked for, turn after turn), feeds it the pools and the
backlog, and hands the bundles it returns to ``ray.autoscaler.sdk.request_resources``.

Policy:
- backlog: tasks queued or running. Tasks pinned to a pool count for it; the others (grouped by
  ``Requirements``) go to the cheapest pool that fits them (farm/routing.py) and may have workers.
  With a deadline, what the cheapest pool cannot finish by then at ``max_workers`` spills to the
  next cheapest.
- no deadline: enough workers to keep every slot busy, ``ceil(backlog / slots_per_worker)``.
- deadline: the fewest workers that finish the backlog by it. A clip is not split, so a slot
  finishes ``floor(deadline / seconds_per_clip)`` clips by then and the pool needs
  ``ceil(backlog / (slots_per_worker * that))`` workers. Fewer nodes, not cheaper clips: the same
  clip-seconds cost the same on any node, but each node pays its boot and model load and holds
  capacity others could use. A deadline that cannot be met asks for ``max_workers`` and says so.
- always within ``[min_workers, max_workers]``; an empty backlog keeps the current workers until
  the pool has been idle ``idle_grace_s``, then lets them go down to ``min_workers``.
- cost: ``workers * slots_per_worker * hours * pool.cost_per_hour`` (Pool's cost is per slot).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from farm.config import DEFAULT_SECONDS_PER_CLIP, SCALE_DOWN_IDLE_S
from farm.routing import cost_order, fitting_pools
from farm.task import Pool, Requirements

if TYPE_CHECKING:  # farm.cluster imports the model stack; only the shapes are needed here
    from farm.cluster import NodeType, PoolCapacity

POOL_RESOURCE = "farm_pool:"  # as farm/cluster.py names it; not imported to keep this module free of Ray


@dataclass(frozen=True)
class PoolScaling:
    """One pool as the autoscaler sees it: a node type whose nodes each offer ``slots_per_worker``
    renderer slots. A fixed pool (an on-prem workstation) has min_workers = max_workers."""

    pool: Pool
    current_workers: int
    slots_per_worker: int = 1
    min_workers: int = 0
    max_workers: int = 0
    seconds_per_clip: float | None = None  # measured mean per slot; None: DEFAULT_SECONDS_PER_CLIP
    idle_for_s: float = 0.0  # how long the pool's backlog has been empty

    def __post_init__(self) -> None:
        if self.slots_per_worker < 1:
            raise ValueError(f"pool {self.pool.name}: slots_per_worker must be at least 1")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(f"pool {self.pool.name}: need 0 <= min_workers <= max_workers")
        if self.seconds_per_clip is not None and self.seconds_per_clip <= 0:
            raise ValueError(f"pool {self.pool.name}: seconds_per_clip must be positive")

    @classmethod
    def fixed(cls, pool: Pool, nodes: int, slots: int, seconds_per_clip: float | None = None) -> PoolScaling:
        """A pool the autoscaler cannot grow or shrink (workstations that joined by hand)."""
        nodes = max(1, nodes)
        return cls(pool, nodes, max(1, slots // nodes), nodes, nodes, seconds_per_clip)

    @property
    def clip_s(self) -> float:
        return self.seconds_per_clip or DEFAULT_SECONDS_PER_CLIP

    def clips_by(self, deadline_s: float) -> int:
        """Clips the pool at max_workers finishes within ``deadline_s``."""
        return self.max_workers * self.slots_per_worker * int(max(deadline_s, 0.0) // self.clip_s)


@dataclass(frozen=True)
class ScalingDecision:
    pool: str
    current_workers: int
    target_workers: int
    reason: str
    slots_per_worker: int = 1

    @property
    def delta(self) -> int:
        return self.target_workers - self.current_workers


@dataclass(frozen=True)
class DeadlineEstimate:
    pool: str
    backlog: int
    workers_needed: int  # before the min/max clamp; for a deadline, the fewest that meet it
    workers: int  # the target
    finish_s: float  # seconds to finish the backlog with ``workers`` (inf: no workers)
    cost_dollars: float
    deadline_s: float | None = None
    reachable: bool = True  # the deadline (if any) is met with ``workers``


@dataclass(frozen=True)
class ScalingPlan:
    decisions: tuple[ScalingDecision, ...]
    estimates: tuple[DeadlineEstimate, ...]
    backlog: Mapping[str, int]  # tasks routed to each pool
    unroutable: int = 0  # tasks no pool fits (or pinned to a pool that is not there)

    @property
    def reachable(self) -> bool:
        return self.unroutable == 0 and all(e.reachable for e in self.estimates)

    @property
    def cost_dollars(self) -> float:
        return sum(e.cost_dollars for e in self.estimates)


def decide(
    scaling: PoolScaling, backlog: int, deadline_s: float | None = None, idle_grace_s: float = SCALE_DOWN_IDLE_S
) -> tuple[ScalingDecision, DeadlineEstimate]:
    """The target worker count of one pool for ``backlog`` tasks, and what it takes to finish them."""
    s, lo, hi, now = scaling.slots_per_worker, scaling.min_workers, scaling.max_workers, scaling.current_workers
    clip_s = scaling.clip_s
    reachable = True
    if backlog <= 0:
        needed = 0
        if scaling.idle_for_s >= idle_grace_s:
            target = lo
            reason = f"idle {scaling.idle_for_s:.0f}s >= {idle_grace_s:.0f}s: down to min_workers {lo}"
        else:
            target = min(max(now, lo), hi)
            reason = f"no backlog for {scaling.idle_for_s:.0f}s (< {idle_grace_s:.0f}s): keep {target}"
    elif deadline_s is None:
        needed = math.ceil(backlog / s)
        target = min(max(needed, lo), hi)
        reason = f"{backlog} tasks keep {needed} workers of {s} slots busy" + _clamped(needed, target, lo, hi)
    else:
        per_slot = int(max(deadline_s, 0.0) // clip_s)  # whole clips one slot finishes by the deadline
        if per_slot == 0:
            needed, target, reachable = math.ceil(backlog / s), hi, False
            reason = f"deadline {deadline_s:.0f}s is shorter than one clip ({clip_s:.0f}s): cannot be met; max {hi}"
        else:
            needed = math.ceil(backlog / (s * per_slot))
            target = min(max(needed, lo), hi)
            reachable = needed <= hi
            if reachable:
                reason = f"{backlog} tasks at {clip_s:.0f}s/clip by {deadline_s:.0f}s need {needed} workers"
                reason += _clamped(needed, target, lo, hi)
            else:
                reason = (
                    f"deadline {deadline_s:.0f}s cannot be met: {backlog} tasks at {clip_s:.0f}s/clip need "
                    f"{needed} workers, max_workers is {hi}"
                )
    finish_s = _finish_s(backlog, target, s, clip_s)
    if deadline_s is not None and backlog > 0:
        reason += f"; done in ~{finish_s:.0f}s" if math.isfinite(finish_s) else "; no workers: never done"
        reachable = reachable and finish_s <= deadline_s
    cost = 0.0 if not math.isfinite(finish_s) else target * s * finish_s / 3600 * scaling.pool.cost_per_hour
    name = scaling.pool.name
    return (
        ScalingDecision(name, now, target, reason, s),
        DeadlineEstimate(name, max(backlog, 0), needed, target, finish_s, round(cost, 6), deadline_s, reachable),
    )


def _clamped(needed: int, target: int, lo: int, hi: int) -> str:
    if target < needed:
        return f", capped at max_workers {hi}"
    if target > needed:
        return f", floored at min_workers {lo}"
    return ""


def _finish_s(backlog: int, workers: int, slots: int, clip_s: float) -> float:
    if backlog <= 0:
        return 0.0
    if workers <= 0:
        return math.inf
    return math.ceil(backlog / (workers * slots)) * clip_s  # rounds of one clip per slot


def backlog_by_pool(
    pools: Iterable[PoolScaling],
    by_pool: Mapping[str, int] | None = None,
    by_needs: Mapping[Requirements, int] | None = None,
    deadline_s: float | None = None,
) -> tuple[dict[str, int], int]:
    """Tasks per pool, and how many no pool can take. Groups that fit fewer pools are placed first,
    so a flexible group spilling over never takes the capacity a constrained one depends on. Which
    pools fit, and in what order, is routing's (farm/routing.py); only pools that have or may get
    workers take work."""
    pools = sorted(pools, key=lambda p: cost_order(p.pool))
    backlog = {p.pool.name: 0 for p in pools}
    usable = {p.pool.name: p for p in pools if max(p.max_workers, p.current_workers) > 0}
    unroutable = 0
    for name, count in (by_pool or {}).items():
        if name in backlog:
            backlog[name] += count
        else:
            unroutable += count
    groups = []
    for needs, count in (by_needs or {}).items():
        fits = [usable[p.name] for p in fitting_pools((s.pool for s in usable.values()), needs)]
        if not fits:
            unroutable += count
        elif count > 0:
            groups.append((len(fits), repr(needs), fits, count))
    for _, _, fits, count in sorted(groups, key=lambda g: g[:2]):
        if deadline_s is not None:
            for p in fits[:-1]:
                take = min(count, max(p.clips_by(deadline_s) - backlog[p.pool.name], 0))
                backlog[p.pool.name] += take
                count -= take
            fits = fits[-1:] if count else []
        if fits:
            backlog[fits[0].pool.name] += count  # the cheapest, or with a deadline what is left for the last
    return backlog, unroutable


def plan(
    pools: Iterable[PoolScaling],
    by_pool: Mapping[str, int] | None = None,
    by_needs: Mapping[Requirements, int] | None = None,
    deadline_s: float | None = None,
    idle_grace_s: float = SCALE_DOWN_IDLE_S,
) -> ScalingPlan:
    """A decision and an estimate for every pool, from the backlog (see the module's policy)."""
    pools = list(pools)
    if deadline_s is not None and pools and all(deadline_s < p.clip_s for p in pools):
        # Passed, or too close for any slot to finish a clip: no pool can help more than another,
        # so size as without a deadline (cheapest pools first) and say the deadline is missed.
        rushed = plan(pools, by_pool, by_needs, None, idle_grace_s)
        note = f"; deadline {deadline_s:.0f}s is past or shorter than a clip: sized as without one"
        return replace(
            rushed,
            decisions=tuple(replace(d, reason=d.reason + note) for d in rushed.decisions),
            estimates=tuple(replace(e, deadline_s=deadline_s, reachable=e.backlog == 0) for e in rushed.estimates),
        )
    backlog, unroutable = backlog_by_pool(pools, by_pool, by_needs, deadline_s)
    pairs = [decide(p, backlog[p.pool.name], deadline_s, idle_grace_s) for p in pools]
    return ScalingPlan(tuple(d for d, _ in pairs), tuple(e for _, e in pairs), backlog, unroutable)


def widest(deadline_plan: ScalingPlan, free_plan: ScalingPlan) -> ScalingPlan:
    """Jobs with and without a deadline share the pools: each pool gets the larger of the two
    targets (more workers never make the deadline harder), the estimates stay the deadline's."""
    free = {d.pool: d for d in free_plan.decisions}
    decisions = tuple(
        free[d.pool] if free[d.pool].target_workers > d.target_workers else d for d in deadline_plan.decisions
    )
    return replace(deadline_plan, decisions=decisions)


def renderers_to_release(renderers: Iterable[tuple[str, str, bool]], keep: int) -> list[str]:
    """Which renderers of a scaled-down pool to stop, given ``(slot, node, idle)`` for each and the
    number of slots the pool keeps: only whole nodes whose renderers are all idle, as long as the
    pool keeps ``keep``. The autoscaler removes a node only when nothing holds it, so stopping some
    renderers of a node while others work frees nothing and only costs a model load later."""
    by_node: dict[str, list[tuple[str, bool]]] = {}
    for slot, node, idle in renderers:
        by_node.setdefault(node or slot, []).append((slot, idle))  # an unknown node stands alone
    excess = sum(len(members) for members in by_node.values()) - keep
    released: list[str] = []
    for members in sorted(by_node.values(), key=len):
        if len(members) <= excess and all(idle for _, idle in members):
            released.extend(slot for slot, _ in members)
            excess -= len(members)
    return released


def resource_bundles(decisions: ScalingPlan | Iterable[ScalingDecision]) -> list[dict[str, float]]:
    """Bundles for ``ray.autoscaler.sdk.request_resources(bundles=...)``: one ``{"farm_pool:<name>": 1}``
    per renderer slot the targets want. Only nodes of the pool's type offer that resource, so the
    autoscaler starts exactly those. ``request_resources`` is declarative: each call replaces the
    previous request (it is not added to it), so sending the current targets every time is safe,
    and sending zero bundles withdraws the request, letting idle nodes go after their idle timeout.
    It asks for at least this much: renderers waiting for a slot can still scale a pool further."""
    if isinstance(decisions, ScalingPlan):
        decisions = decisions.decisions
    return [{f"{POOL_RESOURCE}{d.pool}": 1} for d in decisions for _ in range(d.target_workers * d.slots_per_worker)]


class Autoscaling:
    """The controller's scaling state across turns: the node types Ray's autoscaler can launch
    (none: a fixed-size cluster), each pool's measured seconds per clip and when it last had work,
    the last plan and the resources last requested. Times are the caller's monotonic clock."""

    def __init__(self, node_types: Iterable[NodeType], started: float) -> None:
        self.node_types = list(node_types)
        self.launchable = {t.pool.name for t in self.node_types}
        self.started = started
        self.plan: ScalingPlan | None = None
        self.requested: list[dict[str, float]] | None = None  # None: nothing asked for yet
        self.clip_seconds: dict[str, tuple[float, int]] = {}  # pool → (busy seconds, clips)
        self.busy_at: dict[str, float] = {}  # pool → when it last had backlog or a working renderer

    def record_clip(self, pool: str, seconds: float) -> None:
        """A clip took ``seconds`` of a ``pool`` slot: what deadline estimates are made of."""
        busy_s, clips = self.clip_seconds.get(pool, (0.0, 0))
        self.clip_seconds[pool] = (busy_s + seconds, clips + 1)

    def seconds_per_clip(self, pool: str) -> float | None:
        busy_s, clips = self.clip_seconds.get(pool, (0.0, 0))
        return busy_s / clips if clips else None

    def pool_scalings(self, capacity: Mapping[str, PoolCapacity], now: float) -> list[PoolScaling]:
        """Every pool as the decisions see it: the launchable ones (nodes now, min/max, measured
        seconds per clip, idle time) and the fixed ones (``capacity``: alive nodes), which take
        their share."""
        out = []
        for t in self.node_types:
            cap = capacity.get(t.pool.name)
            out.append(
                PoolScaling(
                    t.pool,
                    len(cap.nodes) if cap else 0,
                    t.slots_per_node,
                    t.min_workers,
                    t.max_workers,
                    self.seconds_per_clip(t.pool.name),
                    now - self.busy_at.get(t.pool.name, self.started),
                )
            )
        out += [
            PoolScaling.fixed(cap.pool, len(cap.nodes), cap.slots, self.seconds_per_clip(name))
            for name, cap in capacity.items()
            if name not in self.launchable
        ]
        return out

    def update(
        self,
        capacity: Mapping[str, PoolCapacity],
        now: float,
        running: Mapping[str, int],
        queued: Mapping[Requirements, int],
        deadlines_s: Iterable[float] = (),
        some_without_deadline: bool = True,
        busy_pools: Iterable[str] = (),
    ) -> ScalingPlan:
        """Plan for the backlog: ``running`` (per pool) counts for the pool running it, ``queued``
        goes where the plan routes it, sized for the tightest of ``deadlines_s``. Jobs without a
        deadline (``some_without_deadline``) are not to be slowed by another's: each pool then
        gets the wider of the two plans. ``busy_pools`` (rendering or loading) are not idle,
        whatever the plan says."""
        pools = self.pool_scalings(capacity, now)
        deadlines = list(deadlines_s)
        result = plan(pools, by_pool=running, by_needs=queued, deadline_s=min(deadlines) if deadlines else None)
        if deadlines and some_without_deadline:
            result = widest(result, plan(pools, by_pool=running, by_needs=queued))
        for name in [n for n, backlog in result.backlog.items() if backlog] + list(busy_pools):
            self.busy_at[name] = now
        self.plan = result
        return result

    def scaled_down(self) -> list[tuple[str, int]]:
        """(pool, slots it keeps) of each launchable pool the last plan has no backlog for: its
        idle renderers beyond that are to go, so the autoscaler can remove their nodes."""
        if self.plan is None:
            return []
        backlog = self.plan.backlog
        return [
            (d.pool, d.target_workers * d.slots_per_worker)
            for d in self.plan.decisions
            if d.pool in self.launchable and not backlog.get(d.pool)
        ]

    def new_request(self) -> list[dict[str, float]] | None:
        """The bundles to request for the last plan's launchable pools, or None when that is what
        was requested already (a request stands until replaced). The caller sets ``requested``
        once the request is made."""
        decisions = self.plan.decisions if self.plan else ()
        bundles = resource_bundles([d for d in decisions if d.pool in self.launchable])
        return None if bundles == self.requested else bundles

    def status(self) -> dict[str, Any]:
        """What was last asked of the autoscaler, and why."""
        p = self.plan
        return {
            "node_types": [asdict(t) for t in self.node_types],
            "requested_bundles": list(self.requested or []),
            "decisions": [asdict(d) for d in p.decisions] if p else [],
            "estimates": [asdict(e) for e in p.estimates] if p else [],
            "backlog": dict(p.backlog) if p else {},
            "unroutable": p.unroutable if p else 0,
        }

    def targets(self) -> dict[str, int]:
        """Launchable pool → the workers last asked for."""
        decisions = self.plan.decisions if self.plan else ()
        return {d.pool: d.target_workers for d in decisions if d.pool in self.launchable}
