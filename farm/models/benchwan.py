"""A Wan 2.1 text-to-video pipeline with the published 1.3B architecture and random weights, for
speed benchmarks (``bench/gpu.py``, ``scripts/build_bench_wan.py``). Nothing is downloaded.

Speed does not depend on the weights' values, so the transformer and the VAE are built from the
published configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) with seeded random weights and saved as a
diffusers directory, loaded back like any checkpoint. The text encoder is a one-layer UMT5 with
the real width (the transformer's ``text_dim``): it runs once per clip, and the real 5.7 B one
would only add its load time. The Q8_0/Q4_0 GGUF files of the transformer go in ``gguf/``, where
farm looks for a local model's GGUF variants (farm/models/variants.py).

``toy`` is the same architecture scaled down (widths multiples of 32, so Q4_0 quantises every
linear layer) for tests on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from farm.models.gguf import write_gguf
from farm.models.tiny import _byte_level_tokenizer
from farm.models.variants import GGUF_DIR

BENCH_SEED = 20260101
WAN21_1_3B_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
SMALL_TEXT_ENCODER: dict[str, Any] = {"d_kv": 64, "num_heads": 2, "num_layers": 1, "d_ff": 256}
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "1.3b": {"transformer": WAN21_1_3B_TRANSFORMER, "vae": WAN21_VAE, "text_encoder": SMALL_TEXT_ENCODER},
    "toy": {
        "transformer": {
            **WAN21_1_3B_TRANSFORMER,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "text_dim": 64,
            "ffn_dim": 64,
            "num_layers": 2,
            "rope_max_seq_len": 64,
        },
        "vae": {**WAN21_VAE, "base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1},
        "text_encoder": {"d_kv": 16, "num_heads": 2, "num_layers": 1, "d_ff": 64},
    },
}
GGUF_QTYPES = ("Q8_0", "Q4_0")


def build_bench_wan(
    directory: Path, size: str = "1.3b", device: str = "cpu", gguf: tuple[str, ...] = GGUF_QTYPES
) -> dict[str, Any]:
    """Build the pipeline into ``directory`` (atomically; kept if already there) and its GGUF
    files. Weights are made on ``device`` (a GPU makes 1.4 B of them in a blink) and saved in
    bf16. Returns what was built: parameter counts, file sizes, seconds."""
    directory = Path(directory)
    report_file = directory / "bench-build.json"
    if report_file.exists():
        report: dict[str, Any] = json.loads(report_file.read_text())
        report["reused"] = True
        return report
    started = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bench-wan-", dir=directory.parent))
    try:
        report = _build(staging, SIZES[size], device, gguf)
        report.update(size=size, seconds=round(time.perf_counter() - started, 1), reused=False)
        (staging / "bench-build.json").write_text(json.dumps(report, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _build(directory: Path, config: dict[str, dict[str, Any]], device: str, gguf: tuple[str, ...]) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _byte_level_tokenizer()
    t_cfg = config["transformer"]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(BENCH_SEED)
        # Any: diffusers' model mixins are untyped
        transformer: Any = WanTransformer3DModel(**t_cfg).to(torch.bfloat16)  # type: ignore[attr-defined]
        vae: Any = AutoencoderKLWan(**config["vae"])
        text_encoder: Any = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=t_cfg["text_dim"],
                relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu",
                **config["text_encoder"],
            )
        ).eval()
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(torch.bfloat16),
        vae=vae.to(torch.bfloat16),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Wan 2.1's flow shift at 480p
    )
    pipeline.save_pretrained(directory)  # type: ignore[attr-defined]  # diffusers' mixins are untyped
    files: dict[str, int] = {}
    for qtype in gguf:
        path = write_gguf(transformer.state_dict(), directory / GGUF_DIR / f"transformer-{qtype}.gguf", qtype)
        files[qtype] = path.stat().st_size
    return {
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "gguf_bytes": files,
    }
