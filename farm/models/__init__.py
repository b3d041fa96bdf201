"""Model registry: the embedded tiny default, local diffusers directories, hub ids.

``resolve_model`` and ``constraints_for`` read only small JSON files, so ``farm validate`` stays
fast; ``load_pipeline`` is where torch and diffusers are imported.
"""

from farm.models.registry import (
    ModelConstraints,
    constraints_for,
    estimate_vram_gb,
    load_pipeline,
    prompt_token_counter,
    resolve_model,
)

__all__ = [
    "ModelConstraints",
    "constraints_for",
    "estimate_vram_gb",
    "load_pipeline",
    "prompt_token_counter",
    "resolve_model",
]
