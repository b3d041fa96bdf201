"""The embedded tiny Wan: built offline, saved, loaded back through diffusers' from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest

from farm.errors import ModelError
from farm.models import constraints_for, load_pipeline, registry, resolve_model
from farm.models.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny_pipeline(shared_model_cache):
    ref = resolve_model("tiny", shared_model_cache)
    return ref, load_pipeline(ref, "cpu")


def generate(pipeline, prompt: str, seed: int):
    import torch

    return pipeline(
        prompt=prompt,
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]


def test_tiny_model_is_a_real_wan_pipeline_on_disk(tiny_pipeline, shared_model_cache):
    ref, pipeline = tiny_pipeline
    directory = ensure_tiny_model(shared_model_cache)
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" == type(pipeline).__name__
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    weights = sum(p.stat().st_size for p in directory.rglob("*.safetensors"))
    assert 0 < weights < 1_000_000
    assert ref.identity == "builtin:tiny-wan-v1"


def test_same_seed_same_pixels_other_seed_or_prompt_other_pixels(tiny_pipeline):
    _, pipeline = tiny_pipeline
    a = generate(pipeline, "a red shoe", 1)
    assert a.shape == (9, 64, 64, 3)
    assert np.array_equal(a, generate(pipeline, "a red shoe", 1))
    assert not np.array_equal(a, generate(pipeline, "a red shoe", 2))
    assert not np.array_equal(a, generate(pipeline, "a blue shoe", 1))


def test_local_directory_loads_the_same_way_with_its_own_limits(tiny_pipeline, shared_model_cache, tmp_path):
    directory = ensure_tiny_model(shared_model_cache)
    ref = resolve_model(str(directory), tmp_path)
    assert (ref.kind, ref.family) == ("local", "WanPipeline")
    limits = constraints_for(ref)
    assert (limits.spatial_multiple, limits.frame_step, limits.max_side) == (16, 4, 512)
    pipeline = load_pipeline(ref, "cpu")
    assert np.array_equal(generate(pipeline, "x", 3), generate(tiny_pipeline[1], "x", 3))


def test_not_a_video_pipeline_is_refused(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelError, match="holds a StableDiffusionPipeline, not a text-to-video pipeline"):
        resolve_model("sd", tmp_path)


@pytest.mark.timeout(120)  # a hang would be the bug: fail the test instead of the whole run
def test_hub_id_without_network_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.setattr(registry, "HUB_HOST", "127.0.0.1")  # nothing listens on 443 here: refused at once
    ref = resolve_model("someone/some-video-model", tmp_path)
    assert ref.kind == "hub"
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache and 127\.0\.0\.1 cannot be reached"):
        load_pipeline(ref, "cpu")
