"""The embedded default model: a real Wan 2.x text-to-video pipeline at toy size.

Built offline from small configs with seeded weights (no download), saved with
``save_pretrained`` and loaded back through ``from_pretrained`` like any real checkpoint, so the
same code path serves real Wan models. About 300 KB; 9 frames at 64×64 in 4 steps take ~0.1 s
on one CPU core. The pictures are noise-like: it has never been trained.

A second embedded model, ``tiny-wan-i2v``, is a ``WanImageToVideoPipeline`` of the same size for
the image-conditioned modes (i2v, flf2v, extend): Wan 2.2 I2V-style, the start (and last) frame
VAE-encoded and concatenated to the noise (transformer ``in_channels`` 16 + 4 mask + 16), no CLIP
image encoder. That is the one Wan layout that takes both ``image=`` and ``image=, last_image=``:
Wan 2.1 FLF2V's ``pos_embed_seq_len`` makes a single image fail, Wan 2.2 TI2V's
``expand_timesteps`` ignores ``last_image``. Its text encoder and VAE are the T2V model's
(same seed, same configs), so both models decode into the same pixel space.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm.locks import exclusive

# Bump when any config or the seed below changes: it is part of every tiny task's id.
TINY_VERSION = "v1"
TINY_SEED = 20261125
# rope_max_seq_len bounds the latent grid per axis: 32 latent tokens × 16 px = 512 px,
# and 32 latent frames × 4 + 1 = 125 frames.
TINY_ROPE_MAX_SEQ_LEN = 32
# The image-to-video model's own version: bump when its config or seed changes (its tasks' ids).
TINY_I2V_VERSION = "v1"
TINY_I2V_SEED = TINY_SEED
# Latent channels, and what an I2V transformer takes: noise + 4 frame-mask channels + condition.
_LATENT_CHANNELS = 16
_I2V_IN_CHANNELS = _LATENT_CHANNELS + 4 + _LATENT_CHANNELS


def tiny_dir(models_root: Path) -> Path:
    return models_root / f"tiny-wan-{TINY_VERSION}"


def tiny_i2v_dir(models_root: Path) -> Path:
    return models_root / f"tiny-wan-i2v-{TINY_I2V_VERSION}"


def ensure_tiny_model(models_root: Path) -> Path:
    """Build the tiny model under ``models_root`` once: concurrent first runs (two submits on a fresh
    FARM_HOME) take a lock in the folder, so one builds and the others wait and find it built."""
    return _ensure(models_root, tiny_dir(models_root), _build)


def ensure_tiny_i2v_model(models_root: Path) -> Path:
    """Build the tiny image-to-video model under ``models_root`` once (as ``ensure_tiny_model``)."""
    return _ensure(models_root, tiny_i2v_dir(models_root), _build_i2v)


def _ensure(models_root: Path, target: Path, build: Callable[[Path], None]) -> Path:
    if (target / "model_index.json").exists():
        return target
    models_root.mkdir(parents=True, exist_ok=True)
    with exclusive(models_root / ".tiny-build.lock"):
        if not (target / "model_index.json").exists():
            _build_once(models_root, target, build)
    return target


def _build_once(models_root: Path, target: Path, build: Callable[[Path], None]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=models_root))
    try:
        build(staging)
        try:
            os.rename(staging, target)  # atomic: a racing builder either wins or finds it done
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _byte_level_tokenizer():
    """A byte-level tokenizer (every UTF-8 prompt maps to distinct ids) built without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _build(directory: Path) -> None:
    _save("WanPipeline", TINY_SEED, _LATENT_CHANNELS, directory)


def _build_i2v(directory: Path) -> None:
    _save("WanImageToVideoPipeline", TINY_I2V_SEED, _I2V_IN_CHANNELS, directory)


def _save(pipeline_class: str, seed: int, in_channels: int, directory: Path) -> None:
    """A tiny pipeline of ``pipeline_class`` from seeded parts, saved as any checkpoint is."""
    import diffusers

    tokenizer, text_encoder, vae, transformer = _seeded_parts(seed, in_channels)
    pipeline = getattr(diffusers, pipeline_class)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipeline.save_pretrained(directory)


def _seeded_parts(seed: int, in_channels: int) -> tuple[Any, Any, Any, Any]:
    """Tokenizer, text encoder, VAE and transformer at toy size, their weights drawn from ``seed``
    (in this order: the T2V model's bytes depend on it)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                num_heads=2,
                num_layers=1,
                d_ff=32,
                relative_attention_num_buckets=8,
            )
        ).eval()
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=in_channels,
            out_channels=_LATENT_CHANNELS,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=TINY_ROPE_MAX_SEQ_LEN,
        )
    return tokenizer, text_encoder, vae, transformer
