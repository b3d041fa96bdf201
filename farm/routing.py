"""Routing: which pools can take a task, cheapest first. The one place this is written; the plan
(``api.routes_for``), the autoscaler's backlog (``scaling.backlog_by_pool``), dispatch
(``Scheduler.routes``) and the fleet's renderer starts all ask here.

Pure: no Ray, no I/O.

Policy:
- a pool fits a task when ``Pool.fits(task.needs)``: the pool it is pinned to (if any), the GPU type
  it asks for (if any, case-insensitively), at least ``min_vram_gb`` of GPU memory (a pool without
  a VRAM limit fits any amount);
- pools that fit are tried cheapest ``cost_per_hour`` first; equal costs by name, so every caller
  orders them the same way and a plan's route is the pool dispatch fills first.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from farm.task import Pool, Requirements


def cost_order(pool: Pool) -> tuple[float, str]:
    """Sort key: cheaper first, then by name."""
    return pool.cost_per_hour, pool.name


def fitting_pools(pools: Iterable[Pool], needs: Requirements) -> list[Pool]:
    """The pools that fit ``needs``, cheapest first."""
    return list(_fitting(tuple(pools), needs))


@lru_cache(maxsize=1024)
def _fitting(pools: tuple[Pool, ...], needs: Requirements) -> tuple[Pool, ...]:
    # Pools and requirements are frozen (hashable), and a cluster has a handful of each: callers
    # that route every task (a plan of thousands) or every dispatch turn pay the sort once.
    return tuple(sorted((p for p in pools if p.fits(needs)), key=cost_order))


def pools_fitting_any(pools: Iterable[Pool], needs_groups: Iterable[Requirements]) -> list[Pool]:
    """The pools that fit at least one of ``needs_groups``, cheapest first (each pool once)."""
    pools = tuple(pools)
    found = {p.name: p for needs in needs_groups for p in _fitting(pools, needs)}
    return sorted(found.values(), key=cost_order)
