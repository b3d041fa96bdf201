"""Resolve a manifest's ``model:`` to a ModelRef, know its size limits, load its pipeline."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farm.config import HUB_CONNECT_TIMEOUT_S, models_dir
from farm.errors import ModelError
from farm.models.fake import FAKE_SPEC, fake_pipeline
from farm.models.tiny import TINY_ROPE_MAX_SEQ_LEN, TINY_VERSION, ensure_tiny_model
from farm.models.variants import GGUF_DIR, need_gb
from farm.task import ModelKind, ModelRef, RenderSettings

BUILTIN_MODELS = ("tiny",)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"
# Text-to-video pipeline classes farm calls with the common (prompt, height, width, num_frames,
# num_inference_steps, guidance_scale) arguments.
TEXT_TO_VIDEO_PIPELINES = (
    "WanPipeline",
    "LTXPipeline",
    "CogVideoXPipeline",
    "HunyuanVideoPipeline",
    "MochiPipeline",
    "SkyReelsV2Pipeline",
    "TextToVideoSDPipeline",
)
# Pipeline classes farm drives in its other modes (farm/models/modes.py): a local directory of one
# of these is a model too.
CONDITIONED_VIDEO_PIPELINES = ("WanImageToVideoPipeline", "WanVideoToVideoPipeline")
VIDEO_PIPELINES = TEXT_TO_VIDEO_PIPELINES + CONDITIONED_VIDEO_PIPELINES
# Wan layouts: 16 px per latent token, 4·k+1 frames (their limits read from the directory's configs).
WAN_FAMILIES = ("WanPipeline", *CONDITIONED_VIDEO_PIPELINES)


@dataclass(frozen=True)
class ModelConstraints:
    """What sizes a model can take. ``frame_step``: frames must be ``frame_step * k + 1``."""

    spatial_multiple: int = 8
    max_side: int | None = None
    frame_step: int = 1
    max_frames: int | None = None

    def problems(self, width: int, height: int, frames: int) -> dict[str, str]:
        """Field name → what is wrong with it, for each field the model cannot take."""
        out: dict[str, str] = {}
        for name, value in (("width", width), ("height", height)):
            if value % self.spatial_multiple:
                lower = max(self.spatial_multiple, value - value % self.spatial_multiple)
                out[name] = (
                    f"{value} is not a multiple of {self.spatial_multiple}; use {lower} or "
                    f"{lower + self.spatial_multiple}"
                )
            elif self.max_side and value > self.max_side:
                out[name] = f"{value} is larger than this model's maximum {self.max_side}"
        if (frames - 1) % self.frame_step:
            lower = frames - (frames - 1) % self.frame_step
            out["frames"] = (
                f"{frames} frames: this model takes {self.frame_step}·k+1 frames; use {lower} or "
                f"{lower + self.frame_step}"
            )
        elif self.max_frames and frames > self.max_frames:
            out["frames"] = f"{frames} is more than this model's maximum {self.max_frames}"
        return out


def resolve_model(spec: str, base_dir: Path) -> ModelRef:
    """Turn ``model:`` into a ModelRef. Relative paths are relative to the manifest's folder."""
    spec = spec.strip()
    if FAKE_SPEC.match(spec):
        return ModelRef(spec, ModelKind.FAKE, spec, f"fake:{spec}", "FakePipeline")
    if spec in BUILTIN_MODELS:
        location = str(models_dir() / f"tiny-wan-{TINY_VERSION}")
        return ModelRef(spec, ModelKind.BUILTIN, location, f"builtin:tiny-wan-{TINY_VERSION}", "WanPipeline")
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or not HUB_ID.match(spec)
    if looks_like_path:
        index = path / "model_index.json"
        if not path.is_dir():
            raise ModelError(
                f"model directory {path} does not exist",
                field="model",
                hint="give a local diffusers directory (with model_index.json), a hub id, or 'tiny'",
            )
        if not index.exists():
            raise ModelError(
                f"{path} has no model_index.json, so it is not a diffusers pipeline directory",
                field="model",
                hint="point at the folder that save_pretrained() wrote",
            )
        family = _pipeline_class(index)
        if family not in VIDEO_PIPELINES:
            raise ModelError(
                f"{path} holds a {family}, not a text-to-video pipeline (nor an image- or video-to-video one) "
                "farm can drive",
                field="model",
                hint="use one of: " + ", ".join(VIDEO_PIPELINES),
            )
        return ModelRef(spec, ModelKind.LOCAL, str(path.resolve()), f"local:{_directory_fingerprint(path)}", family)
    return ModelRef(spec, ModelKind.HUB, spec, f"hub:{spec}", _cached_hub_family(spec) or "unknown")


def _pipeline_class(index: Path) -> str:
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read {index}: {exc}", field="model") from exc


def _directory_fingerprint(path: Path) -> str:
    """Hash of every config file and the size of every weight file: moving or copying the
    directory keeps task ids; retraining or swapping weights changes them. GGUF variants of the
    transformer (``gguf/``) are not in it: adding one leaves the bf16 tasks' ids alone, and a
    GGUF variant's own identity goes into its tasks' ids (farm/models/variants.py)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(f"{GGUF_DIR}/"):
            continue
        digest.update(rel.encode())
        if file.suffix in {".json", ".txt", ".model"}:
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _cached_hub_family(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(hub_id, "model_index.json")
    if isinstance(cached, str):
        return _pipeline_class(Path(cached))
    return None


def constraints_for(model: ModelRef) -> ModelConstraints:
    if model.kind is ModelKind.FAKE:
        return ModelConstraints(spatial_multiple=2)
    if model.kind is ModelKind.BUILTIN:
        return ModelConstraints(
            spatial_multiple=16,
            max_side=TINY_ROPE_MAX_SEQ_LEN * 16,
            frame_step=4,
            max_frames=TINY_ROPE_MAX_SEQ_LEN * 4 + 1,
        )
    if model.family in WAN_FAMILIES and model.kind is ModelKind.LOCAL:
        return _wan_constraints(Path(model.location))
    if model.family in WAN_FAMILIES:
        return ModelConstraints(spatial_multiple=16, frame_step=4)
    return ModelConstraints()


def _wan_constraints(path: Path) -> ModelConstraints:
    try:
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return ModelConstraints(spatial_multiple=16, frame_step=4)
    downsample = vae.get("temperal_downsample", [False, True, True])
    spatial = int(vae.get("scale_factor_spatial", 2 ** len(downsample)))
    temporal = int(vae.get("scale_factor_temporal", 2 ** sum(bool(d) for d in downsample)))
    patch = transformer.get("patch_size", [1, 2, 2])
    rope = transformer.get("rope_max_seq_len")
    multiple = spatial * int(patch[1])
    return ModelConstraints(
        spatial_multiple=multiple,
        max_side=rope * multiple if rope else None,
        frame_step=temporal,
        max_frames=rope * temporal + 1 if rope else None,
    )


def estimate_vram_gb(model: ModelRef, settings: RenderSettings) -> float:
    """The GPU memory (GiB) a clip needs with the precision its settings ask for, for routing when
    the manifest states none (``auto``: the least any variant it may pick needs). An estimate:
    see farm/models/variants.py."""
    return need_gb(model, settings.precision, settings)


# WanPipeline encodes at most this many prompt tokens (its max_sequence_length) and drops the
# rest without a word: the end of an ad prompt, its call to action, is what would be lost.
WAN_MAX_PROMPT_TOKENS = 512


def prompt_token_counter(model: ModelRef) -> tuple[Callable[[str], int], int] | None:
    """(tokens a prompt takes, the most the model's text encoder reads), or None when farm cannot
    count them for this model without loading it (a family other than Wan, a hub model not in the
    local cache)."""
    if model.kind is ModelKind.BUILTIN:  # its tokenizer is byte-level (tiny.py), plus </s>
        return (lambda prompt: len(prompt.encode("utf-8")) + 1), WAN_MAX_PROMPT_TOKENS
    if not model.family.startswith("Wan"):
        return None
    tokenizer_file: Path | None = None
    if model.kind is ModelKind.LOCAL:
        tokenizer_file = Path(model.location) / "tokenizer" / "tokenizer.json"
    elif model.kind is ModelKind.HUB:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.location, "tokenizer/tokenizer.json")
        tokenizer_file = Path(cached) if isinstance(cached, str) else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer  # light: the Rust tokenizer alone, not transformers

    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    @functools.lru_cache(maxsize=65536)  # a matrix repeats its prompts; each is counted once
    def count(prompt: str) -> int:
        return len(tokenizer.encode(prompt).ids)

    return count, WAN_MAX_PROMPT_TOKENS


def _hub_reachable() -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def load_pipeline(model: ModelRef, device: str, dtype_name: str = "auto"):
    """Load the diffusers pipeline for ``model`` onto ``device``. Imports torch and diffusers."""
    if model.kind is ModelKind.FAKE:
        return fake_pipeline(model.spec)
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars and notices would interleave across renderers in the driver's terminal.
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") and model.kind is not ModelKind.BUILTIN else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    source = model.location
    kwargs: dict = {_dtype_keyword(): dtype}
    if model.kind is ModelKind.BUILTIN:
        source = str(ensure_tiny_model(Path(model.location).parent))
    elif model.kind is ModelKind.HUB:
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
            return _prepare(pipeline, device)
        except (OSError, ValueError):
            if not _hub_reachable():
                raise ModelError(
                    f"model {model.spec!r} is not in the local Hugging Face cache and {HUB_HOST} cannot be reached",
                    field="model",
                    hint="download it where there is network (huggingface-cli download) and set "
                    "model: to that local directory",
                ) from None
    pipeline = DiffusionPipeline.from_pretrained(source, **kwargs)
    return _prepare(pipeline, device)


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (with ``_resolve_dtype``)
    and warns on the old name; older releases know only the old one."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _prepare(pipeline, device: str):
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
