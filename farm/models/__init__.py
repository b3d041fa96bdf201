"""Model registry: the embedded tiny default, local diffusers directories, hub ids.

``resolve_model``, ``constraints_for`` and ``model_modes`` read only small JSON files, so
``farm validate`` stays fast; ``load_pipeline``, ``ModePipelines.get`` and ``generate`` are where
torch and diffusers are imported.
"""

from farm.models.modes import (
    ModePipelines,
    effective_steps,
    generate,
    mode_identity,
    model_modes,
    modes_of,
)
from farm.models.registry import (
    ModelConstraints,
    constraints_for,
    estimate_vram_gb,
    load_pipeline,
    prompt_token_counter,
    resolve_model,
)

__all__ = [
    "ModePipelines",
    "ModelConstraints",
    "constraints_for",
    "effective_steps",
    "estimate_vram_gb",
    "generate",
    "load_pipeline",
    "mode_identity",
    "model_modes",
    "modes_of",
    "prompt_token_counter",
    "resolve_model",
]
