"""Loading a model as one of its variants (farm/models/variants.py), and the per-clip GPU settings:
compile, cache hooks, VAE tiling. Imports torch and diffusers; the renderer is its one user (and
``bench/gpu.py``, which measures exactly this code).

Policy:
- The compute dtype is bf16 on a GPU and float32 on a CPU (bf16 matmuls are slow or missing
  there); the embedded tiny model always computes in float32. ``run_variant`` says which.
- ``bf16``: the pipeline resident on the device. Attention is diffusers' default: PyTorch's
  scaled-dot-product attention (flash / memory-efficient kernels on a GPU).
- ``bf16-offload``: diffusers group offloading, the transformer block by block and the text
  encoder leaf by leaf, prefetched on a CUDA stream; the VAE resident. On a CPU there is nothing
  to offload to: it runs as bf16 does, and says so.
- ``int8``: the transformer's linear weights quantised to int8 with torchao (weight-only) at load.
- ``q8``/``q4``: the transformer from its GGUF file through diffusers' GGUF quantiser.
- For int8/q8/q4 the text encoder (used once a clip) is group-offloaded on a GPU.
- ``compile``: regional ``torch.compile`` of the transformer's repeated blocks, once per loaded
  variant; the renderer warms it and counts that as load time.
- Cache hooks are set per clip from the task (their state is reset by the pipeline after each
  call, so a clip never sees the one before).
- Frames above ``TILE_ABOVE_PIXELS`` (480p) decode in tiles; slicing is always on (no effect on pixels
  at batch size 1). Both depend only on the clip's size, so a task decodes the same way anywhere.
"""

from __future__ import annotations

import copy
import gc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import ModelError
from farm.models.registry import load_pipeline
from farm.models.tiny import ensure_tiny_model
from farm.models.variants import GGUF_TYPES, TILE_ABOVE_PIXELS, available, tiny_gguf_path
from farm.task import CacheMode, ModelKind, ModelRef, Precision, RenderSettings


@dataclass
class Loaded:
    """A model loaded as one variant, ready to render."""

    pipeline: Any
    precision: Precision
    device: str
    compute_dtype: str  # "bfloat16" | "float32"
    weights_identity: str
    detail: str = ""  # how: "Q4_0-gguf", "torchao-int8-weight-only", "group-offload", …
    compiled: str = ""  # the torch.compile backend, once compiled
    cache: CacheMode = CacheMode.NONE

    @property
    def run_variant(self) -> str:
        """The variant exactly as run, for the attempt row: ``q4 Q4_0-gguf compute=float32 cpu``."""
        parts = [str(self.precision), self.detail, f"compute={self.compute_dtype}", self.device.split(":")[0]]
        if self.compiled:
            parts.append(f"compiled={self.compiled}")
        return " ".join(p for p in parts if p)


def compute_dtype_name(model: ModelRef, device: str) -> str:
    return "bfloat16" if device.startswith("cuda") and model.kind is not ModelKind.BUILTIN else "float32"


def load_base(model: ModelRef, device: str) -> Any:
    """The model's pipeline in host memory, in the compute dtype it will run in on ``device``."""
    return load_pipeline(model, "cpu", compute_dtype_name(model, device))


def prepare(model: ModelRef, precision: Precision, device: str, base: Any) -> Loaded:
    """Make ``base`` (from ``load_base``; consumed) run as ``precision`` on ``device``."""
    import torch

    precision = Precision(precision)
    dtype_name = compute_dtype_name(model, device)
    dtype = getattr(torch, dtype_name)
    gpu = device.startswith("cuda")
    variant = available(model)[precision]
    loaded = Loaded(base, precision, device, dtype_name, variant.weights_identity)
    if precision is Precision.BF16:
        base.to(device)
    elif precision is Precision.BF16_OFFLOAD:
        loaded.detail = "group-offload" if gpu else "no-offload-on-cpu"
        if gpu:
            _group_offload(base.transformer, device, "block_level")
            _group_offload(base.text_encoder, device, "leaf_level")
            base.vae.to(device)
    else:
        _needs_package("torchao" if precision is Precision.INT8 else "gguf", precision)
        if precision is Precision.INT8:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            transformer = copy.deepcopy(base.transformer).to(device)  # quantised where it runs: fast on a GPU
            quantize_(transformer, Int8WeightOnlyConfig())
            loaded.detail = "torchao-int8-weight-only"
        else:
            from farm.models.gguf import ensure_tiny_gguf, load_gguf_transformer

            qtype = GGUF_TYPES[precision]
            if model.kind is ModelKind.BUILTIN:
                tiny = ensure_tiny_model(Path(model.location).parent)
                config_dir, path = tiny, ensure_tiny_gguf(tiny, tiny_gguf_path(qtype), qtype)
            else:
                config_dir, path = Path(model.location), Path(variant.gguf)
            transformer = load_gguf_transformer(path, config_dir, dtype)
            loaded.detail = f"{qtype}-gguf"
        loaded.pipeline = type(base)(**{**base.components, "transformer": transformer})
        loaded.pipeline.set_progress_bar_config(disable=True)
        del base
        gc.collect()
        transformer.to(device)
        loaded.pipeline.vae.to(device)
        if gpu:
            _group_offload(loaded.pipeline.text_encoder, device, "leaf_level")
    loaded.pipeline.vae.enable_slicing()
    return loaded


def _needs_package(name: str, precision: Precision) -> None:
    """A quantised variant on a node without its package is a one-line error naming the fix."""
    try:
        importlib.import_module(name)
    except ImportError:
        raise ModelError(
            f"precision {precision} needs the {name} package on this renderer's node",
            hint="install farm's quantisation extra there: pip install 'farm[quant]'",
        ) from None


def _group_offload(module: Any, device: str, kind: str) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        module,
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type=kind,
        num_blocks_per_group=1 if kind == "block_level" else None,
        use_stream=True,  # the next group is copied while this one computes
    )


def release(loaded: Loaded | None) -> None:
    """Free what a loaded variant holds on the device (before another is loaded, or after an OOM)."""
    if loaded is not None:
        loaded.pipeline = None
    free_device_memory()


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def compile_transformer(loaded: Loaded, backend: str = "inductor") -> None:
    """Regional torch.compile of the transformer's repeated blocks (the first call compiles)."""
    transformer = loaded.pipeline.transformer
    # Graph breaks allowed: cache hooks (set per clip, after compiling) branch on tensor values and
    # GGUF layers dequantise in Python. Where nothing breaks, the whole block is one graph anyway.
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=False, backend=backend)
    else:
        import torch

        loaded.pipeline.transformer = torch.compile(transformer, fullgraph=False, backend=backend)
    loaded.compiled = backend


def set_cache(loaded: Loaded, mode: CacheMode) -> None:
    """Put the transformer's cache hooks in ``mode`` (none: removed)."""
    mode = CacheMode(mode)
    if mode is loaded.cache:
        return
    transformer = loaded.pipeline.transformer
    if loaded.cache is not CacheMode.NONE:
        transformer.disable_cache()
    loaded.cache = CacheMode.NONE
    if mode is CacheMode.NONE:
        return
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    pipeline = loaded.pipeline
    config: Any
    if mode is CacheMode.FIRST_BLOCK:
        config = FirstBlockCacheConfig(threshold=0.05)
    elif mode is CacheMode.PAB:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipeline.current_timestep,
        )
    else:
        import torch

        config = TaylorSeerCacheConfig(taylor_factors_dtype=getattr(torch, loaded.compute_dtype))
    transformer.enable_cache(config)
    loaded.cache = mode


def set_tiling(loaded: Loaded, s: RenderSettings) -> None:
    """VAE tiling for frames above ``TILE_ABOVE_PIXELS``, off below (a function of the size only)."""
    vae = loaded.pipeline.vae
    if s.width * s.height > TILE_ABOVE_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
