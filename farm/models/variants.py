"""Model variants: how a model's weights are held on an accelerator, the VRAM each needs, and which
one a task gets. Reads only small files (configs, safetensors and GGUF headers): no torch, so
``farm validate`` and ``farm plan`` stay fast.

Policy:
- A model lists its variants (``available``): ``bf16`` and ``bf16-offload`` always; ``int8``
  (torchao, weight-only, quantised at load) for diffusers models; ``q8``/``q4`` when a GGUF file of
  its transformer is there (``<model dir>/gguf/*Q8_0*.gguf``, ``*Q4_0*.gguf``; the embedded tiny
  model builds its own). Fake benchmark models have ``bf16`` only.
- A variant's VRAM need (``need_gb``) is an estimate from the model's parameter counts (safetensors
  headers) and the clip's size: CUDA overhead + the weights resident on the GPU + the largest
  transient of its phases (text encoding, denoising activations, VAE decoding). Models farm cannot
  size (hub ids, non-Wan families) keep the older rough estimate; toy models need 0.
- ``auto`` resolves at plan time, per task, to the first variant of ``AUTO_ORDER`` that fits the
  cheapest pool able to take any of them. The order is throughput first: bf16 resident, then 8-bit
  (near-lossless), then 4-bit; CPU offload last, because streaming the weights over PCIe at every
  step costs each clip time, and a farm pays it per clip. ``int8`` is only ever asked for: whether
  torchao runs on a node is known there, not at plan time.
- An explicit precision the model lacks, or whose need no pool has, is a plan-time error naming
  the pools.
- The resolved precision is written into the task's settings, so it is part of the task id; a GGUF
  variant's file identity joins the model identity in the hash (another q4 file: other pixels).
  Its need becomes the task's ``min_vram_gb`` (never less than the manifest asked), so the task
  runs only on pools that fit that variant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from farm.config import models_dir
from farm.errors import ModelError
from farm.models.tiny import TINY_VERSION
from farm.task import ModelKind, ModelRef, Pool, Precision, RenderSettings, Requirements, Task, compute_task_id

AUTO_ORDER = (Precision.BF16, Precision.Q8, Precision.Q4, Precision.BF16_OFFLOAD)
GGUF_DIR = "gguf"  # GGUF files of a local model's transformer live here (not in its fingerprint)
GGUF_TYPES = {Precision.Q8: "Q8_0", Precision.Q4: "Q4_0"}
TINY_GGUF_VERSION = "g1"  # bump when farm/models/gguf.py writes tiny's files differently
# Transformer classes diffusers loads from a single GGUF file with the original checkpoint's key names.
GGUF_TRANSFORMERS = ("WanTransformer3DModel",)

GIB = 2**30
OVERHEAD_GB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
# Bytes per weight as held on the GPU: GGUF Q8_0 is 34 bytes per 32 weights, Q4_0 18 per 32.
BYTES_PER_WEIGHT = {Precision.BF16: 2.0, Precision.INT8: 1.0, Precision.Q8: 34 / 32, Precision.Q4: 18 / 32}
# The VAE decodes a few frames at a time (causal cache): its peak grows with the frame's area.
VAE_DECODE_BYTES_PER_PIXEL = 10_000
# Frames larger than 480p decode in tiles (farm/models/loading.py), the peak then that of a tile
# with its blending margin. A function of the size only, so a task always decodes the same way.
TILE_ABOVE_PIXELS = 832 * 480
TILE_PIXELS = 384 * 384


@dataclass(frozen=True)
class Profile:
    """What a model's VRAM need is made of: its parameter counts and the shape of its work."""

    transformer_params: float
    transformer_group_params: float  # one block: what bf16-offload streams at a time
    text_encoder_params: float
    text_encoder_group_params: float  # its largest streamed piece (the embedding) and what follows it
    vae_params: float
    dim: int  # transformer hidden size
    ffn_dim: int
    spatial: int = 16  # pixels per latent token side (VAE scale × patch)
    temporal: int = 4  # frames per latent frame

    def tokens(self, s: RenderSettings) -> int:
        return (
            math.ceil(s.height / self.spatial)
            * math.ceil(s.width / self.spatial)
            * ((s.frames - 1) // self.temporal + 1)
        )


# Parameter counts of the published Wan 2.1 T2V configs (Wan-AI/Wan2.1-T2V-*-Diffusers), counted
# from the modules built on the meta device (tests/test_variants.py rechecks the 1.3B transformer's).
# The text encoder is UMT5-XXL's encoder: its largest streamed piece is the 256k-token embedding.
_UMT5_XXL = {"text_encoder_params": 5_680_910_336, "text_encoder_group_params": 1_050_148_864 + 192_948_224}
WAN21_1_3B = Profile(1_418_996_800, 46_440_704, **_UMT5_XXL, vae_params=126_892_531, dim=1536, ffn_dim=8960)
WAN21_14B = Profile(14_288_491_584, 351_394_304, **_UMT5_XXL, vae_params=126_892_531, dim=5120, ffn_dim=13824)


@dataclass(frozen=True)
class Variant:
    """One way to run a model: its precision and the weights it runs with."""

    precision: Precision
    weights_identity: str  # goes into the task id when it is not the model's own identity
    gguf: str = ""  # the GGUF file of a q8/q4 variant ("" for tiny's: built on demand)
    transformer_bytes: float | None = None  # the GGUF file's size, when known


def vram_need_gb(
    profile: Profile, precision: Precision, s: RenderSettings, transformer_bytes: float | None = None
) -> float:
    """Estimated peak GPU memory (GiB) of one clip of ``s`` with ``precision``: see the module's policy."""
    precision = Precision(precision)
    t, te, vae = profile.transformer_params, profile.text_encoder_params, profile.vae_params
    te_streamed = 2.0 * profile.text_encoder_group_params  # bf16, its largest leaf with the next prefetched
    if precision is Precision.BF16:
        resident, text = 2.0 * (t + te + vae), 0.0
    elif precision is Precision.BF16_OFFLOAD:
        resident, text = 2.0 * vae + 2.0 * 2 * profile.transformer_group_params, te_streamed
    else:  # int8, q8, q4: the transformer resident, quantised; the text encoder streamed (used once a clip)
        weights = transformer_bytes if transformer_bytes is not None else BYTES_PER_WEIGHT[precision] * t
        resident, text = weights + 2.0 * vae, te_streamed
    denoise = profile.tokens(s) * (profile.ffn_dim + 8 * profile.dim) * 2.0
    area = s.width * s.height
    decode = float(min(area, TILE_PIXELS if area > TILE_ABOVE_PIXELS else area) * VAE_DECODE_BYTES_PER_PIXEL)
    decode += s.frames * area * 3 * 2.0  # the decoded clip itself
    return math.ceil((OVERHEAD_GB + (resident + max(text, denoise, decode)) / GIB) * 10) / 10


# ----------------------------------------------------------------------------- what a model has


def available(model: ModelRef) -> dict[Precision, Variant]:
    """The variants ``model`` can run as (see the module's policy), by precision."""
    gguf_dir = Path(model.location) / GGUF_DIR if model.kind is ModelKind.LOCAL else None
    try:  # a GGUF file added (or replaced) later is seen: the folder's stamp is part of the cache key
        stamp = gguf_dir.stat().st_mtime_ns if gguf_dir else 0
    except OSError:
        stamp = 0
    return _available(model, stamp)


@functools.cache
def _available(model: ModelRef, stamp: int) -> dict[Precision, Variant]:
    own = {p: Variant(p, model.identity) for p in (Precision.BF16, Precision.BF16_OFFLOAD, Precision.INT8)}
    if model.kind is ModelKind.FAKE:
        return {Precision.BF16: own[Precision.BF16]}
    if model.kind is ModelKind.BUILTIN:  # tiny's GGUF files are built from its seeded weights when first used
        for p, qtype in GGUF_TYPES.items():
            own[p] = Variant(p, f"builtin:tiny-wan-{TINY_VERSION}-{TINY_GGUF_VERSION}-{qtype}")
    elif model.kind is ModelKind.LOCAL and _transformer_class(Path(model.location)) in GGUF_TRANSFORMERS:
        for p, qtype in GGUF_TYPES.items():
            found = sorted((Path(model.location) / GGUF_DIR).glob(f"*{qtype}*.gguf"), key=lambda f: f.name.lower())
            found = found or sorted((Path(model.location) / GGUF_DIR).glob(f"*{qtype.lower()}*.gguf"))
            if found:
                size = found[0].stat().st_size
                own[p] = Variant(p, gguf_identity(found[0]), str(found[0]), float(size))
    return own


def tiny_gguf_path(qtype: str) -> Path:
    """Where the embedded tiny model's GGUF file of ``qtype`` is built (farm/models/gguf.py)."""
    return models_dir() / f"tiny-wan-{TINY_VERSION}-gguf-{TINY_GGUF_VERSION}" / f"transformer-{qtype}.gguf"


def gguf_identity(path: Path) -> str:
    """A GGUF file's identity without reading gigabytes: its size, its head (every tensor's name,
    shape and type) and its last MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(2**20))
        fh.seek(max(0, size - 2**20))
        digest.update(fh.read(2**20))
    return f"gguf:{digest.hexdigest()[:16]}"


def _transformer_class(path: Path) -> str:
    try:
        return str(json.loads((path / "model_index.json").read_text())["transformer"][1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


@functools.cache
def profile_of(model: ModelRef) -> Profile | None:
    """The sizes a Wan-family local model's need is estimated from; None when farm cannot tell
    them without loading it (hub ids, other families, missing headers)."""
    if model.kind is not ModelKind.LOCAL:
        return None
    root = Path(model.location)
    try:
        tcfg = json.loads((root / "transformer" / "config.json").read_text())
        ecfg = json.loads((root / "text_encoder" / "config.json").read_text())
        vcfg = json.loads((root / "vae" / "config.json").read_text())
        t, _ = _safetensors_params(root / "transformer")
        te, te_largest = _safetensors_params(root / "text_encoder")
        vae, _ = _safetensors_params(root / "vae")
        downsample = vcfg.get("temperal_downsample", [False, True, True])
        return Profile(
            transformer_params=t,
            transformer_group_params=t / int(tcfg["num_layers"]),
            text_encoder_params=te,
            text_encoder_group_params=te_largest + te / int(ecfg["num_layers"]),
            vae_params=vae,
            dim=int(tcfg["num_attention_heads"]) * int(tcfg["attention_head_dim"]),
            ffn_dim=int(tcfg["ffn_dim"]),
            spatial=2 ** len(downsample) * int(tcfg.get("patch_size", [1, 2, 2])[1]),
            temporal=2 ** sum(bool(d) for d in downsample),
        )
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _safetensors_params(folder: Path) -> tuple[float, float]:
    """(parameters, the largest tensor's) of a folder's safetensors files, from their headers."""
    total = largest = 0
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors in {folder}")
    for file in files:
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                count = math.prod(meta["shape"])
                total, largest = total + count, max(largest, count)
    return float(total), float(largest)


def need_gb(model: ModelRef, precision: Precision, s: RenderSettings) -> float:
    """The estimated VRAM (GiB) a clip of ``s`` needs with ``precision`` (``auto``: the least any
    variant ``auto`` may pick needs)."""
    precision = Precision(precision)
    if model.kind in (ModelKind.BUILTIN, ModelKind.FAKE):
        return 0.0
    if precision is Precision.AUTO:
        return min(need_gb(model, p, s) for p in AUTO_ORDER if p in available(model))
    profile = profile_of(model)
    if profile is None:  # cannot size it: the weights as bf16 plus a term growing with the clip
        weights = _local_weights_gb(model.location) if model.kind is ModelKind.LOCAL else 0.0
        return round(weights + 2.0 + s.width * s.height * s.frames * 2.5e-7, 1)
    variant = available(model).get(precision)
    return vram_need_gb(profile, precision, s, variant.transformer_bytes if variant else None)


@functools.cache
def _local_weights_gb(location: str) -> float:
    return sum(p.stat().st_size for p in Path(location).rglob("*.safetensors")) / GIB


# ----------------------------------------------------------------------------- plan time


def resolve_tasks(tasks: Sequence[Task], pools: Sequence[Pool]) -> list[Task]:
    """Each task with its variant fixed (``auto`` resolved against ``pools``), its id hashing that
    variant and its ``min_vram_gb`` raised to the variant's need. Tasks that become identical
    collapse. Raises ModelError for a precision the model lacks or no pool fits."""
    memo: dict[tuple[ModelRef, RenderSettings, Requirements], tuple[RenderSettings, Requirements, str]] = {}
    out: dict[str, Task] = {}
    for task in tasks:
        key = (task.model, task.settings, task.needs)
        if key not in memo:
            memo[key] = _resolve(task, pools)
        settings, needs, identity = memo[key]
        if settings != task.settings or identity != task.model.identity:
            task = replace(task, task_id=compute_task_id(identity, task.mode, task.prompt, settings, task.seed))
        out.setdefault(task.task_id, replace(task, settings=settings, needs=needs))
    return list(out.values())


def _resolve(task: Task, pools: Sequence[Pool]) -> tuple[RenderSettings, Requirements, str]:
    """(settings with the precision fixed, needs, the identity its id hashes) of one task."""
    model, s = task.model, task.settings
    variants = available(model)
    asked = Precision(s.precision)
    # What the manifest itself asks of a pool: expansion put the estimate for ``asked`` in
    # min_vram_gb when the manifest gave none, and the chosen variant's need replaces that.
    estimate = need_gb(model, asked, s) if asked is Precision.AUTO or asked in variants else 0.0
    floor = replace(task.needs, min_vram_gb=0.0) if task.needs.min_vram_gb == estimate else task.needs
    if s.compile and asked is Precision.BF16_OFFLOAD:
        raise ModelError(
            f"task {task.task_id} ({task.source}): compile does not combine with precision bf16-offload "
            "(the offload hooks run inside the compiled blocks)",
            field="render.compile",
            hint="drop compile: or use another precision",
        )
    if asked is Precision.AUTO:
        # compile does not combine with offloading: auto then picks among the others
        candidates = [p for p in AUTO_ORDER if p in variants and not (s.compile and p is Precision.BF16_OFFLOAD)]
        chosen = _auto(task, floor, candidates, pools)
    elif asked in variants:
        chosen = asked
    else:
        raise ModelError(
            f"task {task.task_id} ({task.source}) asks for precision {asked}, which model {model.spec} does not have "
            f"(it has {', '.join(variants)})",
            field="render.precision",
            hint=(
                f"put a {GGUF_TYPES[asked]} GGUF file of its transformer in {Path(model.location) / GGUF_DIR}, "
                if asked in GGUF_TYPES and model.kind is ModelKind.LOCAL
                else ""
            )
            + "or use precision: auto",
        )
    needs = _with_need(floor, model, chosen, s)
    if asked is not Precision.AUTO and not any(p.fits(needs) for p in pools) and any(p.fits(floor) for p in pools):
        raise ModelError(
            f"task {task.task_id} ({task.source}) asks for precision {asked}, which needs ~{needs.min_vram_gb:g} GB "
            f"(estimate) at {s.width}x{s.height}x{s.frames}, and no pool has that ({_pools_text(pools)})",
            field="render.precision",
            hint="use precision: auto (the best variant that fits), a smaller clip, or add a pool with more VRAM",
        )
    identity = variants[chosen].weights_identity
    return (
        replace(s, precision=chosen),
        needs,
        model.identity if identity == model.identity else f"{model.identity}+{identity}",
    )


def _with_need(floor: Requirements, model: ModelRef, precision: Precision, s: RenderSettings) -> Requirements:
    return replace(floor, min_vram_gb=max(floor.min_vram_gb, need_gb(model, precision, s)))


def _auto(task: Task, floor: Requirements, candidates: list[Precision], pools: Sequence[Pool]) -> Precision:
    """The first candidate that fits the cheapest pool taking any (pools in routing's cost order)."""
    from farm.routing import cost_order

    needs = {p: _with_need(floor, task.model, p, task.settings) for p in candidates}
    for pool in sorted(pools, key=cost_order):
        for precision in candidates:
            if pool.fits(needs[precision]):
                return precision
    if not any(pool.fits(floor) for pool in pools):
        return candidates[0]  # not a matter of precision (pinned pool, GPU type, floor): routing says why
    smallest = min(candidates, key=lambda p: needs[p].min_vram_gb)
    s = task.settings
    raise ModelError(
        f"task {task.task_id} ({task.source}): no variant of model {task.model.spec} fits any pool at "
        f"{s.width}x{s.height}x{s.frames}; the smallest, {smallest}, needs ~{needs[smallest].min_vram_gb:g} GB "
        f"(estimate) ({_pools_text(pools)})",
        field="render.precision",
        hint="render a smaller clip, or add a pool with more VRAM",
    )


def _pools_text(pools: Sequence[Pool]) -> str:
    return (
        "pools: "
        + ", ".join(f"{p.name} {p.vram_gb:g} GB" if p.vram_gb is not None else f"{p.name} no VRAM limit" for p in pools)
        if pools
        else "no pools"
    )


def precision_counts(tasks: Sequence[Task]) -> dict[str, int]:
    """Resolved precision → how many of ``tasks`` run with it (what ``farm plan`` shows)."""
    return dict(Counter(str(Precision(t.settings.precision)) for t in tasks))


def class_table(profile: Profile, sizes: Sequence[RenderSettings], classes: Sequence[float]) -> list[dict[str, object]]:
    """For each clip size and GPU class (GB): the variants that fit and what ``auto`` picks (README)."""
    rows: list[dict[str, object]] = []
    for s in sizes:
        needs = {p: vram_need_gb(profile, p, s) for p in (*AUTO_ORDER, Precision.INT8)}
        for gb in classes:
            fits = [str(p) for p, need in needs.items() if need <= gb]
            auto = next((str(p) for p in AUTO_ORDER if needs[p] <= gb), None)
            rows.append(
                {"size": f"{s.width}x{s.height}x{s.frames}", "gpu_gb": gb, "fits": fits, "auto": auto, "needs": needs}
            )
    return rows
