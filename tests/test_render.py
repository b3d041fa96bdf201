"""The Renderer as a plain class (no Ray): real tiny model, real files, checksums, commit marker."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from farm.expand import expand
from farm.manifest import load_manifest
from farm.render import Renderer, result_from_record
from farm.storage import OutputTarget, sha256_file
from farm.task import AttemptStatus
from farm.video import probe


@pytest.fixture(scope="module")
def renderer_and_tasks(tmp_path_factory, shared_model_cache):
    folder = tmp_path_factory.mktemp("render")
    manifest = folder / "m.yaml"
    manifest.write_text("campaign: r\nprompt: 'clip {n}'\naxes: {n: [1, 2]}\nrender: {width: 48, frames: 5}\n")
    tasks = expand(load_manifest(manifest)).tasks
    return Renderer(tasks[0].model, threads=1), tasks, folder / "out"


def test_render_writes_video_poster_and_marker_atomically(renderer_and_tasks):
    renderer, tasks, out = renderer_and_tasks
    result = renderer.render(tasks[0], 1, OutputTarget(str(out)))
    assert result.status is AttemptStatus.SUCCEEDED, result.error
    video = out / f"{tasks[0].task_id}.mp4"
    assert result.output_uri == str(video) and result.poster_uri == str(out / f"{tasks[0].task_id}.jpg")
    assert result.sha256 == sha256_file(video) and result.bytes == video.stat().st_size
    info = probe(video)
    assert (info.frames, info.width, info.height, info.fps) == (5, 48, 64, 8.0)
    marker = json.loads((out / f"{tasks[0].task_id}.json").read_text())
    recorded = result_from_record(marker)
    assert replace(recorded, timings=result.timings) == result
    assert recorded.timings.write_s <= result.timings.write_s  # the returned time includes the marker
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    t = result.timings
    assert t.generate_s > 0 and t.encode_s > 0 and t.write_s > 0 and t.load_s > 0


def test_model_is_loaded_once_for_many_renders(renderer_and_tasks):
    renderer, tasks, out = renderer_and_tasks
    loads_before = renderer.info().pipeline_loads
    for task in tasks:
        assert renderer.render(task, 1, OutputTarget(str(out))).succeeded
    assert renderer.info().pipeline_loads == loads_before == 1


def test_same_task_same_bytes(renderer_and_tasks, tmp_path):
    renderer, tasks, _ = renderer_and_tasks
    first = renderer.render(tasks[1], 1, OutputTarget(str(tmp_path / "a")))
    second = renderer.render(tasks[1], 2, OutputTarget(str(tmp_path / "b")))
    assert first.sha256 == second.sha256


def test_a_failing_task_is_a_failed_result_not_a_crash(renderer_and_tasks, tmp_path):
    renderer, tasks, _ = renderer_and_tasks
    bad = replace(tasks[0], settings=replace(tasks[0].settings, width=50))  # odd for the VAE: pipeline raises
    result = renderer.render(bad, 1, OutputTarget(str(tmp_path)))
    assert result.status is AttemptStatus.FAILED and result.error
    assert "\n" not in result.error
    assert not (tmp_path / f"{bad.task_id}.json").exists()
    assert renderer.render(tasks[0], 1, OutputTarget(str(tmp_path))).succeeded  # the renderer carries on


def test_fake_models_are_named_as_such_and_go_through_the_same_render_path(tmp_path):
    from farm.models import resolve_model
    from farm.task import RenderSettings, Task

    model = resolve_model("fake:sleep-5ms", tmp_path)
    assert (model.kind, model.identity) == ("fake", "fake:fake:sleep-5ms")
    renderer = Renderer(model)
    task = Task("fake-task", "x", 0, model, RenderSettings(16, 16, 3, 8, 1, 1.0))
    result = renderer.render(task, 1, OutputTarget(str(tmp_path / "out")))
    assert result.succeeded and result.timings.generate_s >= 0.005
    assert probe(tmp_path / "out" / "fake-task.mp4").frames == 3


def test_local_sink_removes_only_the_temp_files_of_the_names_asked_for(tmp_path):
    from farm.storage import LocalSink

    sink = LocalSink(tmp_path)
    for name in ("a.mp4", "a.jpg", "b.mp4"):
        (tmp_path / f".{name}.tmp-1234abcd").write_bytes(b"half")
    (tmp_path / "a.mp4").write_bytes(b"done")
    assert sink.abort_incomplete({"a.mp4", "a.jpg", "c.mp4"}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.mp4.tmp-1234abcd", "a.mp4"]
    assert LocalSink(tmp_path / "absent").abort_incomplete({"a.mp4"}) == 0
