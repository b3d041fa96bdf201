"""GGUF files of a Wan transformer: written from a diffusers state dict, loaded through diffusers'
own GGUF path (``from_single_file`` with ``GGUFQuantizationConfig`` and ``config=<local dir>``).

Files are written as the community's Wan GGUFs are: with the original Wan checkpoint's key names
(diffusers converts them on load; its converter does not take diffusers' own names back), 2-D
weights whose rows split into 32-wide blocks quantised (Q8_0 or Q4_0), everything else (biases,
norms, modulation, the patch-embedding convolution) kept in float32. Imports torch, numpy and gguf
only inside the functions that need them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# diffusers name → original Wan name, applied in order (the inverse of diffusers'
# convert_wan_transformer_to_diffusers for text-to-video checkpoints).
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)
BLOCK = 32  # Q8_0 and Q4_0 quantise rows in blocks of 32 weights


def original_name(name: str) -> str:
    """A diffusers WanTransformer3DModel parameter name as the original Wan checkpoint names it."""
    for new, old in _TO_ORIGINAL:
        name = name.replace(new, old)
    if name == "scale_shift_table":
        return "head.modulation"
    name = re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", name)
    # diffusers' norm2 is the original's norm3 (cross-attention) and the other way round
    return re.sub(r"\.norm([23])\.", lambda m: f".norm{5 - int(m.group(1))}.", name)


def write_gguf(state_dict: Mapping[str, Any], path: Path, qtype: str) -> Path:
    """Write a diffusers Wan transformer's ``state_dict`` as a GGUF file of ``qtype`` (Q8_0 or
    Q4_0), atomically. Checks that diffusers maps every name back before writing anything."""
    import gguf
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    quant = gguf.GGMLQuantizationType[qtype]
    renamed = {original_name(k): v for k, v in state_dict.items()}
    back = convert_wan_transformer_to_diffusers(dict.fromkeys(renamed))
    if set(back) != set(state_dict):
        raise ValueError(f"GGUF names do not map back to diffusers': {sorted(set(back) ^ set(state_dict))[:4]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(temp), arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type({"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    for name, tensor in renamed.items():
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if data.ndim == 2 and data.shape[1] % BLOCK == 0 and name.endswith(".weight"):
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(temp, path)
    return path


def quantised_tensors(path: Path) -> dict[str, str]:
    """Tensor name → quantisation type of the quantised tensors in a GGUF file."""
    from gguf import GGMLQuantizationType, GGUFReader

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors if t.tensor_type not in plain}


def ensure_tiny_gguf(tiny_model_dir: Path, path: Path, qtype: str) -> Path:
    """Build the embedded tiny model's GGUF file of ``qtype`` at ``path`` once (from its seeded
    weights, so every node builds the same file); safe when several processes race."""
    if path.exists():
        return path
    from diffusers import WanTransformer3DModel

    staging = Path(tempfile.mkdtemp(prefix=".gguf-build-", dir=_parent(path)))
    try:
        transformer = WanTransformer3DModel.from_pretrained(str(tiny_model_dir), subfolder="transformer")
        built = write_gguf(transformer.state_dict(), staging / path.name, qtype)
        os.replace(built, path)  # atomic: a racing builder wrote the same bytes
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def load_gguf_transformer(path: Path, config_dir: Path, compute_dtype: Any) -> Any:
    """A WanTransformer3DModel from a GGUF file through diffusers' GGUF path: weights stay
    quantised in memory and are dequantised layer by layer to ``compute_dtype``."""
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    return WanTransformer3DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        config=str(config_dir),
        subfolder="transformer",
        local_files_only=True,
        torch_dtype=compute_dtype,
    )
