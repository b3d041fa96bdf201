"""Generation modes: which a model renders, what goes into their task ids, the pipeline that runs
each, and the one call that renders a clip in any of them.

- ``t2v``: the model's own text-to-video pipeline.
- ``v2v``: ``WanVideoToVideoPipeline``; from a ``WanPipeline`` it is built on the same components
  (the same weights, nothing copied), so a T2V checkpoint restyles videos too.
- ``i2v`` / ``extend`` (``image=``, for extend the last frame of the clip it continues) and
  ``flf2v`` (``image=``, ``last_image=``): ``WanImageToVideoPipeline``. The embedded ``tiny``
  model serves them with its image-to-video sibling (farm/models/tiny.py), whose version is then
  part of the task id (``mode_identity``).
- ``stitch`` joins rendered segments: no model, so every model "renders" it.

What a real checkpoint can take is read from its configs where they are on disk (a local
directory, a hub model in the local cache): a Wan 2.1 I2V transformer (CLIP image embeddings
without ``pos_embed_seq_len``) cannot take a last frame, a Wan 2.1 FLF2V one cannot take a single
image, Wan 2.2 TI2V (``expand_timesteps``) ignores a last frame, and the V2V pipeline has no second
transformer (Wan 2.2 A14B) nor the Wan 2.2 VAE's patching.

Importing this module imports neither torch nor diffusers; ``ModePipelines.get`` and ``generate``
do.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from farm.models.fake import FakePipeline
from farm.models.registry import TEXT_TO_VIDEO_PIPELINES, load_pipeline
from farm.models.tiny import TINY_I2V_VERSION, ensure_tiny_i2v_model
from farm.task import Mode, ModelKind, ModelRef

if TYPE_CHECKING:
    from PIL.Image import Image

WAN_T2V = "WanPipeline"
WAN_I2V = "WanImageToVideoPipeline"
WAN_V2V = "WanVideoToVideoPipeline"
IMAGE_MODES = frozenset({Mode.I2V, Mode.FLF2V, Mode.EXTEND})
ALL_MODES = frozenset(Mode)
# The embedded image-to-video model, as the image modes of ``tiny`` name it in task ids.
TINY_I2V_IDENTITY = f"tiny-wan-i2v-{TINY_I2V_VERSION}"


def modes_of(family: str) -> frozenset[Mode]:
    """The modes a pipeline family runs (``stitch`` always: it needs no model). A family farm
    cannot see (a hub model not in the local cache: ``unknown``) is taken as text-to-video."""
    if family == WAN_T2V:
        modes = {Mode.T2V, Mode.V2V}
    elif family == WAN_V2V:
        modes = {Mode.V2V}
    elif family == WAN_I2V:
        modes = set(IMAGE_MODES)
    elif family in TEXT_TO_VIDEO_PIPELINES or family == "unknown":
        modes = {Mode.T2V}
    else:
        modes = set()
    return frozenset(modes | {Mode.STITCH})


def model_modes(model: ModelRef) -> frozenset[Mode]:
    """The modes ``model`` renders: its family's, less what its configs show it cannot take. The
    builtin ``tiny`` renders all of them; a fake model (benchmarks) takes every mode and ignores
    the conditioning. Reads small JSON files only."""
    if model.kind in (ModelKind.BUILTIN, ModelKind.FAKE):
        return ALL_MODES
    modes = set(modes_of(model.family))
    configs = _configs(model)
    if configs is None:
        return frozenset(modes)
    index, transformer, vae = configs
    if model.family == WAN_T2V and (_declared(index, "transformer_2") or vae.get("patch_size")):
        modes.discard(Mode.V2V)  # two experts (Wan 2.2 A14B) or the patched Wan 2.2 VAE
    if model.family == WAN_I2V:
        if index.get("expand_timesteps"):
            modes.discard(Mode.FLF2V)  # Wan 2.2 TI2V: the last frame would be ignored
        elif transformer.get("image_dim") is not None:
            # Wan 2.1: CLIP embeddings of one image (I2V) or of exactly two (FLF2V's pos_embed)
            modes -= {Mode.I2V, Mode.EXTEND} if transformer.get("pos_embed_seq_len") else {Mode.FLF2V}
    return frozenset(modes)


def mode_identity(model: ModelRef, mode: Mode) -> str:
    """What goes into the task ids of ``mode``'s tasks: the model's identity, and for the builtin
    model's image modes the image-to-video model that renders them as well."""
    if model.kind is ModelKind.BUILTIN and mode in IMAGE_MODES:
        return f"{model.identity}+{TINY_I2V_IDENTITY}"
    return model.identity


def effective_steps(steps: int, strength: float) -> int:
    """The denoising steps a video-to-video clip runs: diffusers' ``get_timesteps`` rule,
    ``min(int(steps * strength), steps)``. Zero makes the pipeline fail (no timestep to start at)."""
    return min(int(steps * strength), steps)


class ModePipelines:
    """The pipelines a renderer runs its modes with, next to its main (``base``) pipeline: each made
    once and kept. A pipeline built on ``base``'s components is made again when ``base`` changes
    (another variant loaded), so it never holds the weights of one that was dropped."""

    def __init__(self, model: ModelRef, device: str) -> None:
        self.model = model
        self.device = device
        self.modes = model_modes(model)
        self._derived: tuple[Any, Any] | None = None  # (base, the V2V pipeline on its components)
        self._tiny_i2v: Any = None

    def get(self, mode: Mode, base: Any) -> Any:
        """The pipeline that renders ``mode``; ``base`` where it is that pipeline."""
        if mode is Mode.STITCH:
            raise ValueError("mode stitch joins rendered segments: it runs no pipeline")
        if mode not in self.modes:
            renders = ", ".join(sorted(m.value for m in self.modes - {Mode.STITCH}))
            raise ValueError(
                f"model {self.model.spec} ({self.model.family}) cannot render mode {mode.value}; it renders: {renders}"
            )
        if mode in _native_modes(base):
            return base
        if mode is Mode.V2V and type(base).__name__ == WAN_T2V:
            if self._derived is None or self._derived[0] is not base:
                self._derived = None  # drop the old one before building on the new base
                self._derived = (base, video_to_video_from(base))
            return self._derived[1]
        if self.model.kind is ModelKind.BUILTIN and mode in IMAGE_MODES:
            if self._tiny_i2v is None:
                self._tiny_i2v = _load_tiny_i2v(self.model, self.device)
            return self._tiny_i2v
        raise ValueError(f"mode {mode.value} has no pipeline beside a {type(base).__name__} for {self.model.spec}")

    def clear(self) -> None:
        """Drop every pipeline made here (the renderer frees memory, or replaces ``base``)."""
        self._derived = None
        self._tiny_i2v = None


def video_to_video_from(base: Any) -> Any:
    """A ``WanVideoToVideoPipeline`` on a ``WanPipeline``'s components: the same modules (no
    copy), a scheduler of its own (the same config) so the two never share stepping state."""
    from diffusers import WanVideoToVideoPipeline

    if getattr(base, "transformer_2", None) is not None:
        raise ValueError("a WanPipeline with two transformers (Wan 2.2 A14B) has no video-to-video form")
    accepted = inspect.signature(WanVideoToVideoPipeline.__init__).parameters
    parts = {name: part for name, part in base.components.items() if name in accepted}
    parts["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
    pipeline = WanVideoToVideoPipeline(**parts)
    pipeline.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # diffusers mixins untyped
    return pipeline


def generate(
    pipeline: Any,
    mode: Mode,
    *,
    prompt: str,
    negative_prompt: str,
    width: int,
    height: int,
    frames: int,
    steps: int,
    guidance: float,
    seed: int,
    image: Image | None = None,
    last_image: Image | None = None,
    video: list[Image] | None = None,
    strength: float = 0.7,
) -> np.ndarray:
    """Render one clip in ``mode`` with the pipeline ``ModePipelines.get`` gave: frames (T, H, W, 3)
    as floats in [0, 1]. Inputs are already fitted to width × height; a source video is cut to
    ``frames`` frames (it must have at least as many); ``extend`` continues ``image`` (or, if none
    is given, ``video``'s last frame). t2v is called exactly as the renderer always has."""
    inputs = _mode_inputs(mode, frames, steps, image, last_image, video, strength)
    if isinstance(pipeline, FakePipeline):
        return pipeline(num_frames=frames, height=height, width=width).frames[0]
    import torch

    _tolerate_missing_ftfy()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        output = pipeline(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
            **inputs,
        )
    result = output.frames[0]
    if hasattr(result, "cpu"):
        result = result.float().cpu().numpy()
    return result


def _mode_inputs(
    mode: Mode,
    frames: int,
    steps: int,
    image: Image | None,
    last_image: Image | None,
    video: list[Image] | None,
    strength: float,
) -> dict[str, Any]:
    """The pipeline arguments of ``mode`` beyond the common ones; ValueError for what it lacks."""
    if mode is Mode.T2V:
        return {"num_frames": frames}
    if mode is Mode.EXTEND and image is None and video:
        image = video[-1]
    if mode in IMAGE_MODES and image is None:
        raise ValueError(f"mode {mode.value} needs a start image")
    if mode in (Mode.I2V, Mode.EXTEND):
        return {"image": image, "num_frames": frames}
    if mode is Mode.FLF2V:
        if last_image is None:
            raise ValueError("mode flf2v needs a last image")
        if frames < 2:
            raise ValueError(f"mode flf2v needs at least 2 frames (a first and a last), not {frames}")
        return {"image": image, "last_image": last_image, "num_frames": frames}
    if mode is Mode.V2V:
        if not video or len(video) < frames:
            raise ValueError(f"mode v2v needs a source video of at least {frames} frames, not {len(video or [])}")
        if effective_steps(steps, strength) < 1:
            raise ValueError(
                f"strength {strength} of {steps} steps leaves no denoising step (int({steps} × {strength}) = 0): "
                "raise strength or steps"
            )
        return {"video": list(video[:frames]), "strength": strength}
    raise ValueError(f"mode {mode.value} joins rendered segments: it generates nothing")


def _native_modes(base: Any) -> frozenset[Mode]:
    """The modes ``base`` renders by itself."""
    if isinstance(base, FakePipeline):
        return ALL_MODES - {Mode.STITCH}
    family = type(base).__name__
    if family == WAN_I2V:
        return IMAGE_MODES
    if family == WAN_V2V:
        return frozenset({Mode.V2V})
    return frozenset({Mode.T2V})


def _load_tiny_i2v(model: ModelRef, device: str) -> Any:
    """The builtin model's image-to-video sibling, built if need be beside it, loaded as any local
    directory is (float32 everywhere, as the tiny model always computes: farm/models/loading.py)."""
    directory = ensure_tiny_i2v_model(Path(model.location).parent)
    ref = ModelRef(TINY_I2V_IDENTITY, ModelKind.LOCAL, str(directory), TINY_I2V_IDENTITY, WAN_I2V)
    return load_pipeline(ref, device, "float32")


@functools.cache
def _tolerate_missing_ftfy() -> None:
    """diffusers' Wan I2V and V2V modules call ``ftfy.fix_text`` on every prompt but import ftfy only
    when it is installed (WanPipeline checks first), so without it they fail with a NameError.
    Without ftfy they get what WanPipeline does then: the text as it is. With ftfy: untouched."""
    for name in ("pipeline_wan_i2v", "pipeline_wan_video2video"):
        try:
            module = importlib.import_module(f"diffusers.pipelines.wan.{name}")
        except ImportError:
            continue
        if not hasattr(module, "ftfy"):
            module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)  # type: ignore[attr-defined]


def _configs(model: ModelRef) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """(model_index, transformer config, VAE config) where they can be read without loading the
    model (a local directory, a hub model's files in the local cache); None where they cannot."""
    files = ("model_index.json", "transformer/config.json", "vae/config.json")
    out = []
    for name in files:
        path = _config_file(model, name)
        try:
            out.append(json.loads(path.read_text()) if path else {})
        except (OSError, ValueError):
            out.append({})
    return (out[0], out[1], out[2]) if out[0] else None


def _config_file(model: ModelRef, name: str) -> Path | None:
    if model.kind is ModelKind.LOCAL:
        return Path(model.location) / name
    if model.kind is ModelKind.HUB:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(model.location, name)
        return Path(cached) if isinstance(cached, str) else None
    return None


def _declared(index: dict[str, Any], component: str) -> bool:
    """Whether model_index.json names a class for ``component`` (``[null, null]`` when absent)."""
    entry = index.get(component)
    return isinstance(entry, list) and any(entry)
