"""Generation modes on the real tiny models: t2v, v2v on the T2V weights, i2v/flf2v/extend on the
embedded image-to-video model, and which modes a model renders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from farm.models import (
    ModePipelines,
    constraints_for,
    effective_steps,
    generate,
    load_pipeline,
    mode_identity,
    model_modes,
    modes_of,
    resolve_model,
)
from farm.models.tiny import TINY_I2V_VERSION, ensure_tiny_i2v_model
from farm.task import Mode, ModelKind, ModelRef

SIZE = {"width": 32, "height": 32}
IMAGE_MODES = {Mode.I2V, Mode.FLF2V, Mode.EXTEND}


@pytest.fixture(scope="module")
def tiny(shared_model_cache):
    ref = resolve_model("tiny", shared_model_cache)
    return ref, load_pipeline(ref, "cpu"), ModePipelines(ref, "cpu")


def picture(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def render(tiny, mode: Mode, frames: int = 5, seed: int = 7, **inputs) -> np.ndarray:
    _, base, pipelines = tiny
    size = {"width": inputs.pop("width", 32), "height": inputs.pop("height", 32)}
    return generate(
        pipelines.get(mode, base),
        mode,
        prompt="a red shoe",
        negative_prompt="",
        frames=frames,
        steps=2,
        guidance=5.0,
        seed=seed,
        **size,
        **inputs,
    )


def test_t2v_is_the_base_pipeline_called_as_the_renderer_does(tiny):
    import torch

    _, base, pipelines = tiny
    assert pipelines.get(Mode.T2V, base) is base
    out = render(tiny, Mode.T2V)
    assert out.shape == (5, 32, 32, 3) and out.min() >= 0 and out.max() <= 1
    with torch.inference_mode():
        direct = base(
            prompt="a red shoe",
            negative_prompt=None,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
            **SIZE,
        ).frames[0]
    assert np.array_equal(out, direct)


def test_i2v_renders_from_its_image_deterministically(tiny):
    a = render(tiny, Mode.I2V, frames=9, image=picture(1))
    assert a.shape == (9, 32, 32, 3)
    assert np.array_equal(a, render(tiny, Mode.I2V, frames=9, image=picture(1)))
    assert not np.array_equal(a, render(tiny, Mode.I2V, frames=9, image=picture(2)))
    assert not np.array_equal(a, render(tiny, Mode.I2V, frames=9, image=picture(1), seed=8))


def test_flf2v_reads_its_last_image(tiny):
    a = render(tiny, Mode.FLF2V, image=picture(1), last_image=picture(2))
    assert a.shape == (5, 32, 32, 3)
    assert np.array_equal(a, render(tiny, Mode.FLF2V, image=picture(1), last_image=picture(2)))
    # The untrained VAE passes little of a chunk's last frame on: a small change, but a change.
    assert not np.array_equal(a, render(tiny, Mode.FLF2V, image=picture(1), last_image=picture(3)))
    assert not np.array_equal(a, render(tiny, Mode.I2V, image=picture(1)))  # a last frame at all


def test_extend_continues_the_last_frame_of_its_video(tiny):
    clip = [picture(10 + i) for i in range(5)]
    extended = render(tiny, Mode.EXTEND, video=clip)
    assert np.array_equal(extended, render(tiny, Mode.I2V, image=clip[-1]))
    assert np.array_equal(extended, render(tiny, Mode.EXTEND, image=clip[-1]))


def test_image_modes_take_other_sizes_and_lengths(tiny):
    assert render(tiny, Mode.I2V, frames=1, image=picture(1)).shape == (1, 32, 32, 3)
    wide = render(
        tiny, Mode.FLF2V, frames=33, width=48, height=16, image=picture(1, 48, 16), last_image=picture(2, 48, 16)
    )
    assert wide.shape == (33, 16, 48, 3)
    with pytest.raises(ValueError, match="at least 2 frames"):
        render(tiny, Mode.FLF2V, frames=1, image=picture(1), last_image=picture(2))


def test_v2v_restyles_its_source_on_the_t2v_weights(tiny):
    _, base, pipelines = tiny
    v2v = pipelines.get(Mode.V2V, base)
    assert type(v2v).__name__ == "WanVideoToVideoPipeline"
    assert v2v.transformer is base.transformer and v2v.vae is base.vae  # shared, not copied
    assert v2v.scheduler is not base.scheduler
    assert pipelines.get(Mode.V2V, base) is v2v  # made once
    source = [picture(20 + i) for i in range(7)]  # longer than the clip: cut to its 5 frames
    a = render(tiny, Mode.V2V, video=source, strength=0.5)
    assert a.shape == (5, 32, 32, 3)
    assert np.array_equal(a, render(tiny, Mode.V2V, video=source, strength=0.5))
    assert not np.array_equal(a, render(tiny, Mode.V2V, video=source[::-1], strength=0.5))
    assert not np.array_equal(a, render(tiny, Mode.V2V, video=source, strength=1.0))
    with pytest.raises(ValueError, match="at least 5 frames"):
        render(tiny, Mode.V2V, video=source[:3], strength=0.5)


def test_strength_that_leaves_no_step_is_refused(tiny):
    assert effective_steps(10, 0.7) == 7
    assert effective_steps(2, 0.5) == 1
    assert effective_steps(2, 0.3) == 0
    assert effective_steps(4, 1.5) == 4
    with pytest.raises(ValueError, match="leaves no denoising step"):
        render(tiny, Mode.V2V, video=[picture(i) for i in range(5)], strength=0.3)


def test_modes_and_their_identities(tiny):
    ref = tiny[0]
    assert modes_of("WanPipeline") == {Mode.T2V, Mode.V2V, Mode.STITCH}
    assert modes_of("WanVideoToVideoPipeline") == {Mode.V2V, Mode.STITCH}
    assert modes_of("WanImageToVideoPipeline") == IMAGE_MODES | {Mode.STITCH}
    assert modes_of("LTXPipeline") == {Mode.T2V, Mode.STITCH}
    assert model_modes(ref) == set(Mode)
    assert mode_identity(ref, Mode.T2V) == mode_identity(ref, Mode.V2V) == ref.identity == "builtin:tiny-wan-v1"
    for mode in IMAGE_MODES:
        assert mode_identity(ref, mode) == f"builtin:tiny-wan-v1+tiny-wan-i2v-{TINY_I2V_VERSION}"
    with pytest.raises(ValueError, match="stitch"):
        tiny[2].get(Mode.STITCH, tiny[1])


def test_a_saved_i2v_directory_is_a_local_model(shared_model_cache, tmp_path):
    directory = ensure_tiny_i2v_model(shared_model_cache)
    weights = sum(p.stat().st_size for p in directory.rglob("*.safetensors"))
    assert 0 < weights < 1_000_000
    ref = resolve_model(str(directory), tmp_path)
    assert (ref.kind, ref.family) == (ModelKind.LOCAL, "WanImageToVideoPipeline")
    assert model_modes(ref) == IMAGE_MODES | {Mode.STITCH}
    assert mode_identity(ref, Mode.I2V) == ref.identity
    limits = constraints_for(ref)
    assert (limits.spatial_multiple, limits.frame_step, limits.max_side) == (16, 4, 512)
    pipelines = ModePipelines(ref, "cpu")
    base = load_pipeline(ref, "cpu")
    assert pipelines.get(Mode.FLF2V, base) is base
    with pytest.raises(ValueError, match=r"cannot render mode t2v; it renders: extend, flf2v, i2v"):
        pipelines.get(Mode.T2V, base)


def _checkpoint(tmp_path, family: str, index: dict, transformer: dict, vae: dict | None = None) -> ModelRef:
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": family, **index}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer))
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae or {}))
    return resolve_model(str(tmp_path), tmp_path)


@pytest.mark.parametrize(
    ("family", "index", "transformer", "vae", "modes"),
    [
        ("WanImageToVideoPipeline", {}, {"image_dim": 1280}, None, {Mode.I2V, Mode.EXTEND}),  # Wan 2.1 I2V
        ("WanImageToVideoPipeline", {}, {"image_dim": 1280, "pos_embed_seq_len": 514}, None, {Mode.FLF2V}),
        ("WanImageToVideoPipeline", {"expand_timesteps": True}, {}, None, {Mode.I2V, Mode.EXTEND}),  # 2.2 TI2V
        ("WanImageToVideoPipeline", {"boundary_ratio": 0.9}, {}, None, IMAGE_MODES),  # Wan 2.2 A14B
        ("WanPipeline", {"transformer_2": ["diffusers", "WanTransformer3DModel"]}, {}, None, {Mode.T2V}),
        ("WanPipeline", {}, {}, {"patch_size": 2}, {Mode.T2V}),  # Wan 2.2 VAE
        ("WanPipeline", {"transformer_2": [None, None]}, {}, None, {Mode.T2V, Mode.V2V}),
    ],
)
def test_a_checkpoints_configs_say_which_modes_it_takes(tmp_path, family, index, transformer, vae, modes):
    assert model_modes(_checkpoint(tmp_path, family, index, transformer, vae)) == modes | {Mode.STITCH}


def test_importing_farm_models_imports_neither_torch_nor_diffusers():
    code = "import sys, farm.models; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
