"""Model variants (farm/models/variants.py, loading.py, gguf.py): a Q4 GGUF variant built at test
time renders through diffusers' real GGUF path; ``auto`` resolves per pool by VRAM; a request no
pool fits fails at plan time; new settings keep old task ids."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from farm import api
from farm.errors import FarmError
from farm.models import resolve_model
from farm.models import variants as v
from farm.models.gguf import quantised_tensors
from farm.records import attempt_row
from farm.render import Renderer
from farm.storage import OutputTarget
from farm.task import Pool, Precision, RenderSettings, Task, compute_task_id
from tests.toywan import toy_wan_dir

GPU8, GPU12, GPU16 = Pool("gpu8", "T4", 8, 0.3), Pool("gpu12", "3060", 12, 0.4), Pool("gpu16", "A4000", 16, 0.6)
GPU24, GPU48, GPU80 = Pool("gpu24", "L4", 24, 0.8), Pool("gpu48", "L40S", 48, 2.0), Pool("gpu80", "H100", 80, 4.0)
CPU = Pool("cpu")
SQUARE = RenderSettings(width=512, height=512, frames=65, steps=50)  # the seed's 4 s clip
WIDE = RenderSettings(width=832, height=480, frames=81, steps=50)


def manifest(write_manifest, model: Path, render: str, name: str = "m.yaml") -> Path:
    return write_manifest(
        f"campaign: variants\nmodel: {model}\nprompt: 'a fox {{n}}'\naxes: {{n: [1, 2]}}\nrender: {render}\n", name
    )


def plan(path: Path, pools: list[Pool]) -> api.Plan:
    return api.plan(path, pools=pools, done=lambda ids, out: {})


def test_a_q4_gguf_variant_built_at_test_time_loads_through_diffusers_gguf_path_and_renders(
    write_manifest, farm_home, tmp_path
):
    model_dir = toy_wan_dir()
    q4_file = next((model_dir / "gguf").glob("*Q4_0*.gguf"))
    kinds = quantised_tensors(q4_file)
    assert kinds and set(kinds.values()) == {"Q4_0"} and any(".ffn.0." in name for name in kinds)
    q4 = plan(manifest(write_manifest, model_dir, "{width: 64, height: 64, frames: 9, steps: 2, precision: q4}"), [CPU])
    bf16 = plan(manifest(write_manifest, model_dir, "{width: 64, height: 64, frames: 9, steps: 2}", "b.yaml"), [CPU])
    task, plain = q4.tasks[0], bf16.tasks[0]
    assert task.settings.precision == "q4" and task.task_id != plain.task_id  # the variant is part of the id
    assert task.task_id == compute_task_id(
        f"{task.model.identity}+{v.gguf_identity(q4_file)}", "t2v", task.prompt, task.settings, task.seed
    )
    renderer = Renderer(task.model, threads=1)
    out = OutputTarget(str(tmp_path / "out"))
    result = renderer.render(task, 1, out)
    assert result.succeeded, result.error
    assert result.run_variant == "q4 Q4_0-gguf compute=float32 cpu"  # on a CPU it computes in float32, and says so
    assert result.weights_identity == v.gguf_identity(q4_file)
    transformer = renderer._loaded.pipeline.transformer
    quantised = [p for p in transformer.parameters() if type(p).__name__ == "GGUFParameter"]
    assert quantised and {p.quant_type.name for p in quantised} == {"Q4_0"}  # held quantised, dequantised per layer
    row = attempt_row(task, result, out.uri, final=True)
    assert (row["precision"], row["run_variant"], row["weights_identity"]) == (
        "q4",
        result.run_variant,
        v.gguf_identity(q4_file),
    )
    other = renderer.render(plain, 1, out)  # the renderer swaps to bf16 for a bf16 task
    assert other.succeeded and other.run_variant == "bf16 compute=float32 cpu" and other.sha256 != result.sha256


def test_auto_resolves_per_task_to_the_best_variant_that_fits_the_cheapest_pool_able_to_take_it(monkeypatch):
    model = resolve_model(str(toy_wan_dir()), Path("."))
    monkeypatch.setattr(v, "profile_of", lambda m: v.WAN21_14B)  # the published 14B's sizes
    monkeypatch.setattr(v, "available", lambda m: {p: v.Variant(p, m.identity) for p in Precision if p != "auto"})

    def resolved(settings: RenderSettings, pools: list[Pool]) -> tuple[str, float]:
        task = Task("t", "a fox", 1, model, replace(settings, precision=Precision.AUTO))
        (out,) = v.resolve_tasks([task], pools)
        return str(out.settings.precision), out.needs.min_vram_gb

    by_class = {pool.vram_gb: resolved(SQUARE, [pool])[0] for pool in (GPU8, GPU12, GPU16, GPU24, GPU48, GPU80)}
    assert by_class == {8: "bf16-offload", 12: "q4", 16: "q4", 24: "q8", 48: "bf16", 80: "bf16"}
    # A cluster: the cheapest pool that can take the task decides, per task.
    assert resolved(SQUARE, [GPU12, GPU48])[0] == "q4"  # 512x512x65 in 4 bits fits 12 GB
    precision, need = resolved(WIDE, [GPU12, GPU48])  # 832x480x81 in 4 bits does not: offloading does
    assert precision == "bf16-offload" and need <= 12
    assert resolved(SQUARE, [GPU48, GPU80])[0] == "bf16"
    assert resolved(SQUARE, [CPU, GPU12])[0] == "bf16"  # a pool without a VRAM limit takes anything


def test_plan_resolves_auto_shows_the_choice_and_routes_only_to_pools_that_fit(write_manifest, farm_home, monkeypatch):
    from farm.cli.planning import _summary

    monkeypatch.setattr(v, "profile_of", lambda m: v.WAN21_1_3B)
    path = manifest(write_manifest, toy_wan_dir(), "{width: 832, height: 480, frames: 81, precision: auto}")
    cheap_small = plan(path, [GPU12, replace(GPU24, cost_per_hour=1.0)])
    assert {t.settings.precision for t in cheap_small.tasks} == {"q8"} and cheap_small.routes == {"gpu12": 2}
    assert _summary(path, cheap_small)["precision"] == {"q8": 2}
    big_only = plan(path, [GPU24])
    assert {t.settings.precision for t in big_only.tasks} == {"bf16"}
    assert all(t.needs.min_vram_gb > 16 for t in big_only.tasks)  # it runs only where bf16 fits
    assert {t.task_id for t in big_only.tasks}.isdisjoint(t.task_id for t in cheap_small.tasks)


def test_a_request_no_pool_can_fit_is_a_one_line_plan_time_error_naming_the_pools(
    write_manifest, farm_home, monkeypatch
):
    monkeypatch.setattr(v, "profile_of", lambda m: v.WAN21_1_3B)
    path = manifest(write_manifest, toy_wan_dir(), "{width: 832, height: 480, frames: 81, precision: bf16}")
    with pytest.raises(FarmError) as caught:
        plan(path, [GPU12, GPU16])
    message = str(caught.value)
    assert "\n" not in message and "precision bf16, which needs ~18" in message
    assert "pools: gpu12 12 GB, gpu16 16 GB" in message and "precision: auto" in message
    tiny_only = manifest(
        write_manifest, toy_wan_dir(), "{width: 1024, height: 1024, frames: 257, precision: auto}", "8k.yaml"
    )
    with pytest.raises(FarmError, match=r"no variant of model .* fits any pool at 1024x1024x257"):
        plan(tiny_only, [GPU8])
    no_gguf = shutil.copytree(toy_wan_dir(), Path(str(path.parent)) / "no-gguf", ignore=shutil.ignore_patterns("gguf"))
    with pytest.raises(FarmError, match=r"precision q4, which model .* does not have .* put a Q4_0 GGUF file"):
        plan(manifest(write_manifest, no_gguf, "{precision: q4}", "q.yaml"), [CPU])
    assert resolve_model(str(no_gguf), Path(".")).identity == resolve_model(str(toy_wan_dir()), Path(".")).identity


def test_settings_left_out_keep_the_task_ids_farm_gave_before_them():
    # Computed with the task.py of the commit before precision/cache/compile existed.
    assert compute_task_id("m", "t2v", "p", RenderSettings(), 3) == "e499c71c5a3fb48d3b3d70d4"
    assert compute_task_id("m", "t2v", "p", RenderSettings(precision=Precision.Q4), 3) != "e499c71c5a3fb48d3b3d70d4"


def test_published_wan_sizes_are_what_diffusers_builds_from_the_configs():
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from farm.models.benchwan import WAN21_1_3B_TRANSFORMER

    with init_empty_weights():
        transformer = WanTransformer3DModel(**WAN21_1_3B_TRANSFORMER)
    assert sum(p.numel() for p in transformer.parameters()) == v.WAN21_1_3B.transformer_params
    assert sum(p.numel() for p in transformer.blocks[0].parameters()) == v.WAN21_1_3B.transformer_group_params
    assert v.WAN21_1_3B.dim == 1536 and v.WAN21_1_3B.ffn_dim == WAN21_1_3B_TRANSFORMER["ffn_dim"]
