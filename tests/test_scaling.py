"""Scaling decisions (farm/scaling.py): pure, so plain tables in, numbers and reasons out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from farm.config import DEFAULT_SECONDS_PER_CLIP, SCALE_DOWN_IDLE_S
from farm.scaling import (
    PoolScaling,
    ScalingDecision,
    backlog_by_pool,
    decide,
    plan,
    renderers_to_release,
    resource_bundles,
    widest,
)
from farm.task import Pool, Requirements

L4 = Pool("l4", "L4", 24, 0.80)
A10G = Pool("gpu24", "A10G", 24, 1.01)
A100 = Pool("a100_80", "A100", 80, 5.12)


def ps(pool=L4, current=0, slots=1, lo=0, hi=8, clip_s=None, idle=0.0) -> PoolScaling:
    return PoolScaling(pool, current, slots, lo, hi, clip_s, idle)


@pytest.mark.parametrize(
    ("scaling", "backlog", "target", "reason"),
    [
        (ps(), 1, 1, "1 tasks keep 1 workers"),
        (ps(), 5, 5, "5 tasks keep 5 workers"),
        (ps(slots=8), 17, 3, "17 tasks keep 3 workers of 8 slots"),  # ceil(17 / 8)
        (ps(slots=8), 16, 2, "keep 2 workers"),
        (ps(hi=8), 100, 8, "capped at max_workers 8"),
        (ps(lo=2), 1, 2, "floored at min_workers 2"),
        (ps(current=6), 2, 2, "keep 2 workers"),  # fewer wanted: the autoscaler removes only idle nodes
        (ps(current=4, idle=10), 0, 4, "no backlog for 10s"),  # within the grace period: hold
        (ps(current=4, lo=1, idle=SCALE_DOWN_IDLE_S), 0, 1, "down to min_workers 1"),
        (ps(current=4, idle=SCALE_DOWN_IDLE_S + 1), 0, 0, "down to min_workers 0"),
        (ps(current=9, hi=3, idle=1), 0, 3, "keep 3"),  # more nodes than allowed: never above max
    ],
)
def test_backlog_to_workers(scaling, backlog, target, reason):
    decision, estimate = decide(scaling, backlog)
    assert (decision.pool, decision.current_workers, decision.target_workers) == (
        scaling.pool.name,
        scaling.current_workers,
        target,
    )
    assert reason in decision.reason
    assert estimate.reachable and estimate.deadline_s is None


@pytest.mark.parametrize(
    ("scaling", "backlog", "deadline_s", "target", "reachable", "reason"),
    [
        # 100 clips at 60 s by 600 s: a slot does 10, so 10 one-slot workers
        (ps(clip_s=60, hi=20), 100, 600, 10, True, "need 10 workers"),
        # clips are not split: by 90 s a slot does 1 clip, not 1.5 (ceil(10*60/90) = 7 would be late)
        (ps(clip_s=60, hi=20), 10, 90, 10, True, "need 10 workers"),
        (ps(clip_s=60, slots=8, hi=2), 100, 600, 2, True, "need 2 workers"),  # ceil(100 / (8*10))
        (ps(clip_s=60, hi=4), 100, 600, 4, False, "be met: 100 tasks at 60s/clip need 10 workers, max_workers is 4"),
        (ps(clip_s=60, hi=4), 10, 30, 4, False, "shorter than one clip"),
        (ps(clip_s=60, hi=4), 10, 0, 4, False, "shorter than one clip"),  # already past
        (ps(clip_s=60, lo=3, hi=8), 10, 600, 3, True, "floored at min_workers 3"),
        (ps(hi=20), 20, 10 * DEFAULT_SECONDS_PER_CLIP, 2, True, "need 2 workers"),  # default clip time
        (ps(hi=0), 5, 600, 0, False, "no workers: never done"),
    ],
)
def test_deadline(scaling, backlog, deadline_s, target, reachable, reason):
    decision, estimate = decide(scaling, backlog, deadline_s)
    assert decision.target_workers == estimate.workers == target
    assert estimate.reachable is reachable
    assert reason in decision.reason
    assert (estimate.finish_s <= deadline_s) is reachable


def test_deadline_finish_and_cost_arithmetic():
    # a100_80 nodes: 8 slots at $5.12 each an hour. 100 clips, 90 s each, by 1800 s: a slot does 20,
    # so ceil(100 / 160) = 1 node; 100 clips over 8 slots is 13 rounds of 90 s = 1170 s.
    decision, est = decide(ps(A100, slots=8, hi=2, clip_s=90), 100, 1800)
    assert (est.workers_needed, est.workers, est.finish_s) == (1, 1, 1170)
    assert est.cost_dollars == pytest.approx(1 * 8 * 1170 / 3600 * 5.12)  # 13.312
    assert "done in ~1170s" in decision.reason
    # without a deadline: ceil(100/8) = 13 nodes capped at 2; 7 rounds
    _, est = decide(ps(A100, slots=8, hi=2, clip_s=90), 100)
    assert (est.workers_needed, est.workers, est.finish_s) == (13, 2, 630)
    assert est.cost_dollars == pytest.approx(2 * 8 * 630 / 3600 * 5.12)
    _, est = decide(ps(Pool("studio", "RTX4090", 24, 0.0), current=1, lo=1, hi=1), 30)
    assert (est.finish_s, est.cost_dollars) == (30 * DEFAULT_SECONDS_PER_CLIP, 0.0)
    _, est = decide(ps(hi=0), 5)
    assert math.isinf(est.finish_s) and est.cost_dollars == 0.0


@pytest.mark.parametrize(
    ("by_pool", "by_needs", "deadline_s", "expected", "unroutable"),
    [
        ({"gpu24": 3}, {}, None, {"l4": 0, "gpu24": 3, "a100_80": 0}, 0),
        ({}, {Requirements(): 7}, None, {"l4": 7, "gpu24": 0, "a100_80": 0}, 0),  # cheapest that fits
        ({}, {Requirements(min_vram_gb=40): 7}, None, {"l4": 0, "gpu24": 0, "a100_80": 7}, 0),
        ({}, {Requirements(gpu_type="a10g"): 2}, None, {"l4": 0, "gpu24": 2, "a100_80": 0}, 0),
        ({"h100": 4}, {Requirements(min_vram_gb=200): 5}, None, {"l4": 0, "gpu24": 0, "a100_80": 0}, 9),
        # by 600 s at 60 s/clip l4 (max 8) finishes 80 and gpu24 (max 8) 80; the rest go to a100_80
        ({}, {Requirements(): 200}, 600, {"l4": 80, "gpu24": 80, "a100_80": 40}, 0),
        # the A100-only group is placed first; the flexible one spills around it
        (
            {},
            {Requirements(): 170, Requirements(gpu_type="A100"): 150},
            600,
            {"l4": 80, "gpu24": 80, "a100_80": 160},
            0,
        ),
    ],
)
def test_backlog_by_pool(by_pool, by_needs, deadline_s, expected, unroutable):
    pools = [ps(A100, slots=8, hi=2, clip_s=60), ps(L4, clip_s=60), ps(A10G, clip_s=60)]
    assert backlog_by_pool(pools, by_pool, by_needs, deadline_s) == (expected, unroutable)


def test_plan_deadline_spill_is_reachable_and_bundles():
    pools = [ps(L4, clip_s=60), ps(A10G, clip_s=60), ps(A100, slots=8, hi=2, clip_s=60)]
    result = plan(pools, by_needs={Requirements(): 200}, deadline_s=600)
    targets = {d.pool: d.target_workers for d in result.decisions}
    assert targets == {"l4": 8, "gpu24": 8, "a100_80": 1}  # a100_80: ceil(40 / (8 * 10))
    assert result.reachable
    assert result.cost_dollars == pytest.approx(8 * 0.80 * 600 / 3600 + 8 * 1.01 * 600 / 3600 + 8 * 5.12 * 300 / 3600)
    bundles = resource_bundles(result)
    assert len(bundles) == 8 + 8 + 8  # one per wanted slot
    assert bundles.count({"farm_pool:a100_80": 1}) == 8 and bundles.count({"farm_pool:l4": 1}) == 8

    late = plan(pools, by_needs={Requirements(): 1000}, deadline_s=600)
    assert not late.reachable
    assert "cannot be met" in next(d.reason for d in late.decisions if d.pool == "a100_80")


@pytest.mark.parametrize("deadline_s", [-300.0, 0.0, 30.0])  # passed, now, shorter than any clip
def test_a_deadline_no_pool_can_meet_sizes_as_without_one(deadline_s):
    pools = [ps(L4, clip_s=60), ps(A10G, clip_s=60), ps(A100, slots=8, hi=2, clip_s=60)]
    late = plan(pools, by_needs={Requirements(): 20}, deadline_s=deadline_s)
    assert {d.pool: d.target_workers for d in late.decisions} == {"l4": 8, "gpu24": 0, "a100_80": 0}
    assert late.backlog == {"l4": 20, "gpu24": 0, "a100_80": 0}  # not all of it thrown at the priciest pool
    assert not late.reachable and all("sized as without one" in d.reason for d in late.decisions)


def test_jobs_without_a_deadline_are_not_slowed_by_one_with_a_relaxed_deadline():
    pools = [ps(L4, clip_s=60), ps(A10G, clip_s=60)]
    relaxed = plan(pools, by_needs={Requirements(): 100}, deadline_s=7 * 86400)
    assert {d.pool: d.target_workers for d in relaxed.decisions}["l4"] == 1  # one worker makes it in a week
    free = plan(pools, by_needs={Requirements(): 100})
    both = widest(relaxed, free)
    assert {d.pool: d.target_workers for d in both.decisions} == {"l4": 8, "gpu24": 0}
    assert both.estimates == relaxed.estimates
    tight = plan(pools, by_needs={Requirements(): 100}, deadline_s=600)  # l4 takes 8 x 10 clips, gpu24 the 20 left
    assert {d.pool: d.target_workers for d in widest(tight, free).decisions} == {"l4": 8, "gpu24": 2}


@pytest.mark.parametrize(
    ("renderers", "keep", "released"),
    [
        ([("a", "n1", True), ("b", "n2", True), ("c", "n3", False)], 1, ["a", "b"]),  # one-slot nodes
        ([("a", "n1", True), ("b", "n2", True)], 2, []),  # the pool keeps them all
        # An 8-slot node with one renderer still working frees nothing: leave all of it.
        ([(f"s{i}", "big", i != 3) for i in range(8)], 0, []),
        ([(f"s{i}", "big", True) for i in range(8)], 0, [f"s{i}" for i in range(8)]),
        # Keep 8 of 16 slots: one whole idle node goes, the other stays.
        (
            [(f"a{i}", "n1", True) for i in range(8)] + [(f"b{i}", "n2", True) for i in range(8)],
            8,
            [f"a{i}" for i in range(8)],
        ),
        ([(f"a{i}", "n1", True) for i in range(8)], 3, []),  # freeing 5 slots of a node frees no node
        ([("a", "", True), ("b", "", True)], 0, ["a", "b"]),  # node not known yet: each stands alone
    ],
)
def test_only_whole_idle_nodes_are_released(renderers, keep, released):
    assert renderers_to_release(renderers, keep) == released


def test_bundles_follow_targets_and_empty_withdraws():
    decisions = [
        ScalingDecision("l4", 0, 3, "", 1),
        ScalingDecision("a100_80", 1, 1, "", 8),
        ScalingDecision("gpu24", 2, 0, "", 1),
    ]
    assert resource_bundles(decisions) == [{"farm_pool:l4": 1}] * 3 + [{"farm_pool:a100_80": 1}] * 8
    idle = plan([ps(current=3, idle=SCALE_DOWN_IDLE_S)])
    assert resource_bundles(idle) == []  # request nothing: idle nodes go after their timeout


def test_pool_resource_name_matches_cluster():
    from farm.cluster import POOL_RESOURCE
    from farm.scaling import POOL_RESOURCE as SCALING_POOL_RESOURCE

    assert SCALING_POOL_RESOURCE == POOL_RESOURCE


@pytest.mark.parametrize(
    "kwargs",
    [{"slots_per_worker": 0}, {"min_workers": 3, "max_workers": 2}, {"seconds_per_clip": 0.0}, {"min_workers": -1}],
)
def test_pool_scaling_rejects_nonsense(kwargs):
    base = {"pool": L4, "current_workers": 0, "max_workers": 2} | kwargs
    with pytest.raises(ValueError):
        PoolScaling(**base)


# ------------------------------------------------------------------ farm plan with a deadline, offline

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = """
campaign: deadline-test
prompt: "clip {{n}}"
deadline: {deadline}
axes:
  n: [{numbers}]
"""


def _manifest(tmp_path: Path, deadline: str, clips: int = 360) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(deadline=deadline, numbers=", ".join(map(str, range(clips)))))
    return path


def _plan_json(manifest: Path) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm.cli",
            "plan",
            str(manifest),
            "--cluster-config",
            str(ROOT / "cluster.yaml"),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_sizes_cluster_yaml_pools_for_a_deadline_at_the_stated_default(farm_home, tmp_path):
    """360 clips at the stated 60 s/clip: 2 h fit the cheapest pool (l4) with 3 workers; 30 min
    need more than l4's max of 8, so the rest spills to the next-cheapest pool (gpu24)."""
    relaxed = _plan_json(_manifest(tmp_path, "2h"))
    assert relaxed["deadline_s"] == 7200
    pools = relaxed["scaling"]["pools"]
    assert pools["l4"]["tasks"] == 360 and pools["l4"]["workers"] == 3  # ceil(360 * 60 / 7200)
    assert pools["gpu24"]["workers"] == 0 and pools["a100_80"]["workers"] == 0
    assert relaxed["scaling"]["reachable"] and relaxed["scaling"]["cost_dollars"] == pytest.approx(
        3 * 2 * 0.80
    )  # 3 L4 slots for 2 h at $0.80/h
    assert "at 60s/clip" in pools["l4"]["reason"]

    tight = _plan_json(_manifest(tmp_path, "30m"))["scaling"]
    assert tight["pools"]["l4"]["workers"] == 8 and tight["pools"]["l4"]["tasks"] == 240  # 8 * 1800 / 60
    assert tight["pools"]["gpu24"]["tasks"] == 120 and tight["pools"]["gpu24"]["workers"] == 4
    assert tight["reachable"]

    impossible = _plan_json(_manifest(tmp_path, "5m"))["scaling"]
    assert not impossible["reachable"]  # 8 + 8 + 2·8 slots cannot render 360 minutes of clips in 5
    assert impossible["pools"]["a100_80"]["workers"] == 2  # every pool at its max


def test_plan_uses_measured_render_times(farm_home, tmp_path):
    from farm import api
    from farm.catalog import Catalog, JobRecord
    from farm.records import attempt_row
    from farm.task import AttemptStatus, Result, Timings

    manifest = _manifest(tmp_path, "1h")
    before = api.plan(manifest, cluster_config=ROOT / "cluster.yaml")
    assert {e.pool: e.workers for e in before.scaling.estimates}["l4"] == 6  # 360 * 60 s / 3600 s
    # Ten clips of this model were rendered before, 12 s each (render + encode + write).
    catalog = Catalog(farm_home / "catalog")
    earlier = before.tasks[:10]
    catalog.record_job(
        JobRecord(
            "earlier",
            "deadline-test",
            datetime.now(UTC),
            "me",
            "host",
            str(manifest),
            "sha",
            "yaml",
            "tiny",
            before.manifest.target.uri,
            2,
            tuple(t.task_id for t in earlier),
            "0",
        )
    )
    output = Path(before.manifest.target.uri)
    output.mkdir(parents=True, exist_ok=True)
    with catalog.writer("earlier") as writer:
        for t in earlier:
            clip = output / f"{t.task_id}.mp4"
            clip.write_bytes(b"clip")  # "done" is verified: the clip must be there with its recorded size
            done = Result(
                t.task_id,
                1,
                AttemptStatus.SUCCEEDED,
                output_uri=str(clip),
                bytes=4,
                timings=Timings(load_s=30.0, generate_s=10.0, encode_s=1.5, write_s=0.5),
            )
            writer.add(attempt_row(t, done, before.manifest.target.uri, final=True))
    after = api.plan(manifest, cluster_config=ROOT / "cluster.yaml")
    assert len(after.to_render) == 350  # what is done is not planned again
    l4 = {e.pool: e for e in after.scaling.estimates}["l4"]
    assert l4.workers == 2 and l4.backlog == 350  # ceil(350 * 12 s / 3600 s); the model load is not per clip
    assert "at 12s/clip" in {d.pool: d.reason for d in after.scaling.decisions}["l4"]


def test_autoscaling_state_across_turns():
    """The controller's scaling state: requests what the backlog needs once (a request stands),
    keeps the nodes through a short lull, lets them go after the grace, and measures clip time."""
    from farm.cluster import NodeType, PoolCapacity
    from farm.scaling import Autoscaling

    burst = Pool("burst", "H200", 141, 9.0)
    scaling = Autoscaling([NodeType("burst", burst, 1, 0, 2)], started=0.0)
    heavy = {Requirements(min_vram_gb=100): 4}
    scaling.update({}, 1.0, running={}, queued=heavy)
    assert scaling.targets() == {"burst": 2} and scaling.scaled_down() == []
    assert scaling.new_request() == [{"farm_pool:burst": 1}] * 2
    scaling.requested = scaling.new_request()
    assert scaling.new_request() is None  # asked already
    two_nodes = {"burst": PoolCapacity(burst, 2, ("n1", "n2"), 1.0)}
    # A renderer still rendering or loading keeps the pool busy, whatever the queue says.
    scaling.update(two_nodes, 500.0, running={}, queued={}, busy_pools={"burst"})
    scaling.update(two_nodes, 510.0, running={}, queued={})
    assert scaling.targets() == {"burst": 2} and scaling.scaled_down() == [("burst", 2)]
    scaling.update(two_nodes, 500.0 + SCALE_DOWN_IDLE_S + 1, running={}, queued={})
    assert scaling.scaled_down() == [("burst", 0)] and scaling.new_request() == []  # withdrawn
    assert scaling.seconds_per_clip("burst") is None
    scaling.record_clip("burst", 30.0)
    scaling.record_clip("burst", 50.0)
    assert scaling.seconds_per_clip("burst") == 40.0
    assert scaling.pool_scalings(two_nodes, 0.0)[0].seconds_per_clip == 40.0
    assert scaling.status()["backlog"] == {"burst": 0} and scaling.status()["node_types"][0]["name"] == "burst"
