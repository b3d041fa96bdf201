"""Sequences end to end on the local Ray: a 6-segment chain through a killed renderer, a segment
that fails for good (its descendants blocked), a cancel and resubmit, an edited shot; the stitched
film measured with ffprobe; every time exactly once on the catalog. Then the modes (i2v, v2v,
keyframes) through a real job, and input content in task ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from farm import api
from farm.catalog import Catalog
from farm.faults import Fault
from farm.storage import sha256_file

SHOTS = ["one", "two", "three", "four", "five", "six"]
CHAIN = """
campaign: {name}
model: tiny
render: {{width: 32, height: 32, frames: 5, fps: 8, steps: 2}}
sequence:
  plan: chained
  crossfade: 1
  shots:
{shots}
seeds: [1]
retries: 1
"""


def chain_manifest(write_manifest, name: str, edit: str = "") -> Path:
    shots = "\n".join(f'    - prompt: "shot {s} of the lighthouse{edit if s == "three" else ""}"' for s in SHOTS)
    return write_manifest(CHAIN.format(name=name, shots=shots), name=f"{name}.yaml")


def rows_of(farm_home: Path) -> list[dict]:
    return Catalog(farm_home / "catalog").attempts().to_pylist()


def part(row: dict) -> str:
    variant = dict(row["variant"])
    return "film" if variant["part"] == "film" else f"{variant['part']} {variant['shot']}"


def assert_exactly_once(farm_home: Path) -> Counter:
    """No task succeeded twice; every success is its clip on disk; a task is never attempted
    before its parents' successes."""
    rows = rows_of(farm_home)
    ok = Counter(r["task_id"] for r in rows if r["status"] == "succeeded")
    assert set(ok.values()) <= {1}, ok
    finished = {r["task_id"]: r["finished_at"] for r in rows if r["status"] == "succeeded"}
    for r in rows:
        if r["status"] in ("succeeded", "failed"):
            assert Path(r["output_uri"] or r["output_root"]).exists()
            for parent in r["parents"] or ():
                assert parent in finished and finished[parent] <= r["started_at"], f"{part(r)} ran before {parent}"
    return ok


def ffprobe(path: str) -> dict:
    assert shutil.which("ffprobe"), "ffprobe comes with scripts/install-test-services.sh (Debian ffmpeg)"
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=nb_read_frames,r_frame_rate,width,height", "-of", "json", path],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["streams"][0]


def test_a_chain_survives_a_killed_renderer_and_stitches_into_one_film(
    ray_local, farm_home, write_manifest, faults, tmp_path
):
    path = chain_manifest(write_manifest, "chain")
    faults(Fault("shot three", action="exit", once=str(tmp_path / "killed")))  # its renderer dies mid-chain
    outcome = api.submit(path, workers=2)
    assert (outcome.run.succeeded, outcome.run.failed) == (7, 0)
    rows = rows_of(farm_home)
    assert any(r["status"] == "interrupted" and part(r) == "segment 3" for r in rows)
    assert_exactly_once(farm_home)
    done = {part(r): r for r in rows if r["status"] == "succeeded"}
    # Each later segment read its parent's clip: the URI and sha256 of the bytes it read.
    for k in range(2, 7):
        (read,) = done[f"segment {k}"]["inputs"]
        parent = done[f"segment {k - 1}"]
        assert (read["uri"], read["sha256"]) == (parent["output_uri"], parent["sha256"])
        assert done[f"segment {k}"]["seam_score"] > 0
    assert done["segment 1"]["seam_score"] is None
    film = done["film"]
    assert film["parents"] == [done[f"segment {k}"]["task_id"] for k in range(1, 7)]
    assert len(film["seam_scores"]) == 5
    # 6 × 5 frames, each cut losing its overlapping frame and its 1-frame crossfade.
    probed = ffprobe(film["output_uri"])
    assert (int(probed["nb_read_frames"]), probed["r_frame_rate"], probed["width"]) == (20, "8/1", 32)
    assert sha256_file(Path(film["output_uri"])) == film["sha256"]


def test_a_failed_segment_blocks_the_rest_and_an_edited_shot_renders_only_what_follows(
    ray_local, farm_home, write_manifest, faults
):
    path = chain_manifest(write_manifest, "blocked")
    faults(Fault("shot four"))  # fails for good
    first = api.submit(path, workers=2)
    assert (first.run.succeeded, first.run.failed) == (3, 4)  # 1 failed, 3 blocked
    status = api.status(first.job_id)
    assert status.counts == {"succeeded": 3, "failed": 1, "blocked": 3, "pending": 0}
    blocked = [r for r in rows_of(farm_home) if r["status"] == "blocked"]
    assert sorted(part(r) for r in blocked) == ["film", "segment 5", "segment 6"]
    assert all(r["final"] and r["attempt"] == 0 and r["error_kind"] == "parent_failed" for r in blocked)

    faults()
    again = api.submit(path, workers=2)  # resumes mid-graph: only what failed or was blocked
    assert (len(again.plan.done), again.run.succeeded, again.run.failed) == (3, 4, 0)
    assert_exactly_once(farm_home)
    before = {part(r): r["task_id"] for r in rows_of(farm_home) if r["status"] == "succeeded"}

    edited = api.submit(chain_manifest(write_manifest, "blocked", edit=", at dusk"), workers=2)
    rendered = {part(r) for r in rows_of(farm_home) if r["job_id"] == edited.job_id and r["status"] == "succeeded"}
    assert rendered == {"segment 3", "segment 4", "segment 5", "segment 6", "film"}
    assert len(edited.plan.done) == 2
    after = {part(r): r["task_id"] for r in rows_of(farm_home) if r["job_id"] == edited.job_id}
    assert all(after[p] != before[p] for p in rendered)
    assert_exactly_once(farm_home)


def test_a_cancelled_chain_resumes_where_it_stopped(ray_local, farm_home, write_manifest, faults):
    from farm.controller import CONTROLLER_NAME, NAMESPACE

    path = chain_manifest(write_manifest, "cancel")
    faults(Fault("shot three", action="slow", hang_s=1.5))
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(outcome=api.submit(path, workers=2)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while len(list((farm_home / "outputs").rglob("*.json"))) < 2:
        assert time.monotonic() < deadline, "the chain never got to segment 3"
        time.sleep(0.05)
    job_id = Catalog(farm_home / "catalog").jobs()[-1].job_id
    controller = ray_local.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    ray_local.get(controller.cancel.remote(job_id))
    thread.join(timeout=120)
    assert box["outcome"].run.state == "cancelled"
    done = api.status(job_id).counts["succeeded"]
    assert 2 <= done < 7
    faults()
    again = api.submit(path, workers=2)
    assert len(again.plan.done) == done and again.run.succeeded == 7 - done
    assert_exactly_once(farm_home)


MODES = """
campaign: modes
model: tiny
render: {{width: 32, height: 32, frames: 5, steps: 2}}
prompt: "the {{product}} {{look}}"
axes:
  product: [bottle, sneaker]
  look:
    - value: still
      mode: i2v
      image: {packshots}/{{product}}.png
    - value: restyled
      mode: v2v
      video: {street}
      strength: 0.5
      fit: pad
"""


@pytest.fixture
def example_inputs(tmp_path) -> tuple[Path, Path]:
    from farm.inputs import synthetic_clip

    packshots = Path(__file__).parent.parent / "manifests" / "inputs" / "packshots"
    street = tmp_path / "street.mp4"
    synthetic_clip(street, frames=9, width=48, height=32)
    return packshots, street


def test_image_and_video_modes_render_and_record_their_inputs(ray_local, farm_home, write_manifest, example_inputs):
    packshots, street = example_inputs
    path = write_manifest(MODES.format(packshots=packshots, street=street))
    outcome = api.submit(path, workers=2)
    assert (outcome.run.succeeded, outcome.run.failed) == (4, 0)
    rows = [r for r in rows_of(farm_home) if r["status"] == "succeeded"]
    assert sorted(r["mode"] for r in rows) == ["i2v", "i2v", "v2v", "v2v"]
    for r in rows:
        (read,) = r["inputs"]
        assert read["sha256"] == sha256_file(Path(read["uri"]))
        probed = ffprobe(r["output_uri"])
        assert (int(probed["nb_read_frames"]), probed["width"], probed["height"]) == (5, 32, 32)
    assert {r["inputs"][0]["uri"] for r in rows} == {
        str(packshots / "bottle.png"),
        str(packshots / "sneaker.png"),
        str(street),
    }


def test_task_ids_follow_an_inputs_content_not_its_path(farm_home, write_manifest, tmp_path):
    from farm.expand import expand
    from farm.manifest import load_manifest

    packshots = Path(__file__).parent.parent / "manifests" / "inputs" / "packshots"
    shutil.copy(packshots / "bottle.png", tmp_path / "a.png")
    text = 'campaign: ids\nmode: i2v\nimage: {image}\nprompt: "a bottle"\n'
    first = expand(load_manifest(write_manifest(text.format(image=tmp_path / "a.png")))).tasks[0]
    shutil.copy(tmp_path / "a.png", tmp_path / "moved.png")
    moved = expand(load_manifest(write_manifest(text.format(image=tmp_path / "moved.png")))).tasks[0]
    assert moved.task_id == first.task_id and moved.inputs[0].uri != first.inputs[0].uri
    shutil.copy(packshots / "watch.png", tmp_path / "a.png")  # same path, another picture
    changed = expand(load_manifest(write_manifest(text.format(image=tmp_path / "a.png")))).tasks[0]
    assert changed.task_id != first.task_id
    t2v = expand(load_manifest(write_manifest('campaign: ids\nprompt: "a bottle"\n'))).tasks[0]
    assert t2v.task_id not in (first.task_id, changed.task_id) and t2v.inputs == ()


BAD_INPUTS = [
    ("mode: i2v\nimage: missing.png\n", "image: ", "does not exist", 3),
    ("mode: i2v\nimage: {here}/notes.txt\n", "image: ", "neither an image nor a video", 3),
    ("mode: v2v\nvideo: {here}/short.mp4\n", "video: ", "fewer than the 9 frames", 3),
    ("mode: v2v\nvideo: {here}/long.mp4\nstrength: 0.2\n", "strength", "no denoising step", 4),
    ("mode: i2v\n", "mode", "mode i2v needs image:", 2),
    ("image: {here}/a.png\n", "image", "mode t2v does not read it", 2),
    ("mode: stitch\n", "mode", "planned by farm for a sequence", 2),
]


@pytest.mark.parametrize(("keys", "field", "message", "line"), BAD_INPUTS)
def test_bad_inputs_are_one_line_with_file_line_and_field(tmp_path, write_manifest, keys, field, message, line):
    from farm.errors import ManifestError
    from farm.inputs import synthetic_clip

    (tmp_path / "notes.txt").write_text("not a picture\n")
    shutil.copy(Path(__file__).parent.parent / "manifests" / "inputs" / "packshots" / "watch.png", tmp_path / "a.png")
    synthetic_clip(tmp_path / "short.mp4", frames=5)
    synthetic_clip(tmp_path / "long.mp4", frames=9)
    path = write_manifest("campaign: bad\n" + keys.format(here=tmp_path) + 'prompt: "a street"\nrender: {steps: 4}\n')
    with pytest.raises(ManifestError) as caught:
        api.validate(path)
    text = str(caught.value)
    assert "\n" not in text and message in text and f"{path}:{line}" in text and field in text, text


def test_the_cli_refuses_a_bad_input_in_one_line_with_exit_2(tmp_path, write_manifest, farm_home):
    path = write_manifest('campaign: bad\nmode: i2v\nimage: nowhere/{product}.png\nprompt: "{product}"\n'
                          "axes: {product: [bottle]}\n")  # fmt: skip
    done = subprocess.run(
        [str(Path(__file__).parent.parent / ".venv" / "bin" / "farm"), "validate", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert "nowhere/bottle.png does not exist" in line and ":3" in line


def test_the_example_manifests_validate_and_the_keyframe_plan_renders_its_segments_side_by_side(ray_local, farm_home):
    examples = Path(__file__).parent.parent / "manifests"
    subprocess.run([str(examples.parent / ".venv" / "bin" / "python"), "scripts/make_example_inputs.py"], check=True,
                   cwd=examples.parent)  # fmt: skip
    for name in ("i2v", "v2v", "sequence", "sequence-keyframes"):
        api.validate(examples / f"{name}.yaml")
    outcome = api.submit(examples / "sequence-keyframes.yaml", output=str(farm_home / "out"), workers=2)
    assert (outcome.run.succeeded, outcome.run.failed) == (9, 0)
    rows = {part(r): r for r in rows_of(farm_home) if r["status"] == "succeeded"}
    assert sorted(rows) == ["film", *(f"keyframe {k}" for k in range(2, 6)), *(f"segment {k}" for k in range(1, 5))]
    first = rows["segment 1"]["inputs"]
    assert first[0]["uri"].endswith("keyframes/open.png") and first[1]["uri"] == rows["keyframe 2"]["output_uri"]
    # Segments wait on keyframes only, never on each other: they render side by side.
    keys = {rows[f"keyframe {k}"]["task_id"] for k in range(2, 6)}
    assert all(set(rows[f"segment {k}"]["parents"]) <= keys for k in range(1, 5))
    assert_exactly_once(farm_home)
    probed = ffprobe(rows["film"]["output_uri"])
    assert (int(probed["nb_read_frames"]), probed["r_frame_rate"]) == (31, "8/1")


SEQUENCE = "campaign: seq\nrender: {frames: 5}\nsequence:\n  plan: PLAN\n  crossfade: 2\n  shots:\nSHOTS"
BAD_SEQUENCES = [
    ("keyframes", '    - {prompt: "a", frames: 1}\n    - {prompt: "b"}\n', "shot 1 has 1 frames"),
    ("chained", '    - {prompt: "a"}\n  last_image: x.png\n', "last_image: closes a keyframes plan"),
    (
        "chained",
        '    - {prompt: "a {p}"}\n    - {prompt: "b"}\naxes:\n  p: [x, {value: y, render: {frames: 1}}]\n',
        "shot 1 has 1 frames",
    ),
    (
        "chained",
        '    - {prompt: "a {p}"}\naxes:\n  p: [x, {value: y, mode: i2v, image: a.png}]\n',
        "plans its own modes",
    ),
    ("chained", '    - {prompt: "a"}\ntasks: [{prompt: b}]\n', "has no tasks:"),
]


@pytest.mark.parametrize(("plan", "shots", "message"), BAD_SEQUENCES)
def test_a_sequence_is_checked_for_every_variant(tmp_path, write_manifest, plan, shots, message):
    from farm.errors import ManifestError

    shutil.copy(Path(__file__).parent.parent / "manifests" / "inputs" / "packshots" / "watch.png", tmp_path / "a.png")
    path = write_manifest(SEQUENCE.replace("PLAN", plan).replace("SHOTS", shots))
    with pytest.raises(ManifestError, match=message):
        api.validate(path)


def test_the_closing_keyframe_has_its_own_id_and_a_seed_at_the_limit_is_fine(write_manifest):
    import pyarrow as pa

    from farm.expand import expand
    from farm.manifest import load_manifest
    from farm.records import TASK_COLUMNS, arrow_schema, task_row

    text = SEQUENCE.replace("PLAN", "keyframes").replace("SHOTS", '    - {prompt: "a"}\n    - {prompt: "a"}\n')
    tasks = expand(load_manifest(write_manifest(text + "seeds: [5, 6, 9223372036854775807]\n"))).tasks
    keys = [t for t in tasks if dict(t.variant)["part"] == "keyframe"]
    assert len(keys) == 3 * 3 - 3  # per seed: shots 1 and 2 share a prompt (one still), the closing one differs
    pa.Table.from_pylist([task_row(t) for t in tasks], schema=arrow_schema(TASK_COLUMNS))
