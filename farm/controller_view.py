"""What the controller's metrics show at a scrape, built from its parts: jobs and their progress,
pools with their renderers' states (the fleet) and the autoscaler's targets. Pure: no Ray."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from farm.metrics import FarmSnapshot, JobSnapshot, PoolSnapshot
from farm.task import JobState, Pool

if TYPE_CHECKING:
    from farm.cluster import PoolCapacity
    from farm.fleet import Fleet
    from farm.jobs import JobProgress
    from farm.records import JobRecord
    from farm.scaling import Autoscaling


def job_snapshot(record: JobRecord, p: JobProgress, wall_now: datetime) -> JobSnapshot:
    """One job's gauges. A job that is over has no ETA (0), whatever its last estimate was."""
    return JobSnapshot(
        record.job_id,
        record.campaign,
        record.model,
        record.priority,
        p.state,
        {
            "queued": p.queued - p.waiting_for_pool,
            "waiting_for_pool": p.waiting_for_pool,
            "running": p.in_flight,
            "succeeded": p.succeeded,
            "failed": p.failed,
        },
        (p.succeeded + p.failed) / p.total if p.total else 1.0,
        p.eta_s if p.state in (JobState.RUNNING, JobState.CANCELLING) else 0.0,
        (record.deadline_at - wall_now).total_seconds() if record.deadline_at is not None else None,
    )


def pool_snapshots(fleet: Fleet, autoscaling: Autoscaling) -> list[PoolSnapshot]:
    """Every pool with alive nodes, and every pool the autoscaler can launch (with none yet)."""
    targets = autoscaling.targets()
    pools: dict[str, tuple[Pool, PoolCapacity | None]] = {name: (cap.pool, cap) for name, cap in fleet.capacity.items()}
    pools.update({t.pool.name: (t.pool, None) for t in autoscaling.node_types if t.pool.name not in pools})
    return [
        PoolSnapshot(
            name,
            pool.gpu_type or "",
            pool.vram_gb,
            pool.cost_per_hour,
            cap.slots if cap else 0,
            fleet.states(name),
            len(cap.nodes) if cap else 0,
            targets.get(name, 0) if name in autoscaling.launchable else None,
        )
        for name, (pool, cap) in sorted(pools.items())
    ]


def farm_snapshot(
    jobs: list[tuple[JobRecord, JobProgress]], fleet: Fleet, autoscaling: Autoscaling, wall_now: datetime
) -> FarmSnapshot:
    return FarmSnapshot([job_snapshot(record, p, wall_now) for record, p in jobs], pool_snapshots(fleet, autoscaling))
