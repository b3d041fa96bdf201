"""Expansion: a loaded manifest → its tasks. Pure: it reads no file and starts nothing.

The matrix: every value of each axis × every row of each zip group × every row of the rows file
× every seed, plus explicit tasks. Render settings layer: the defaults (``RenderSettings()``) <
the manifest's ``render`` < axis values (in order of declaration) < row columns < an explicit
task's own ``render``. Identical tasks (same task id) collapse into one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from farm.manifest import (
    RENDER_FIELDS,
    SEED_MAX,
    AxisEntry,
    AxisValue,
    ManifestFile,
    RenderOverrides,
    RequirementsSpec,
    RowsFile,
    Scalar,
    SeedRange,
    Where,
    error_at,
)
from farm.models import estimate_vram_gb
from farm.task import Mode, RenderSettings, Requirements, Task, compute_task_id
from farm.template import TemplateError, parse_template

DataPath = tuple[str | int, ...]  # a place in the manifest's data, e.g. ("axes", "platform", 0)
Origin = DataPath | Where  # where a value was set: in the manifest, or in a rows file
Layer = tuple[dict[str, Any], Origin]  # render overrides and where they were set


@dataclass
class _Variant:
    """Part of a combination: placeholder values and render overrides, each with where it came from."""

    values: dict[str, str] = field(default_factory=dict)
    # Render overrides with where they were set: a manifest path, or a place in a rows file.
    overrides: list[Layer] = field(default_factory=list)
    prompt: str | None = None
    prompt_where: Where | None = None
    seed: int | None = None
    requirements: RequirementsSpec | None = None


@dataclass(frozen=True)
class Expansion:
    tasks: list[Task]
    expanded: int  # tasks before identical ones collapsed


def expand(mf: ManifestFile) -> Expansion:
    """Expand a manifest into its tasks (deterministic order; identical tasks collapse)."""
    m = mf.manifest
    seeds = list(range(m.seeds.base, m.seeds.base + m.seeds.count)) if isinstance(m.seeds, SeedRange) else m.seeds
    if not seeds:
        raise mf.error("no seeds given", "seeds", hint="give a list such as [0, 1] or {count: 2}")
    tasks: dict[str, Task] = {}
    expanded = 0
    for source, parts in _combinations(mf):
        for task in _tasks_of(mf, source, parts, seeds):
            expanded += 1
            tasks.setdefault(task.task_id, task)
    return Expansion(list(tasks.values()), expanded)


def _combinations(mf: ManifestFile) -> list[tuple[str, list[_Variant]]]:
    """(where it came from, its parts) for each combination of the matrix, then each explicit task."""
    m = mf.manifest
    groups = _axis_groups(mf) + ([_rows_group(mf.rows)] if mf.rows is not None else [])
    names = [n for g in groups for n in (g[0].values if g else {})]
    combos: list[tuple[str, list[_Variant]]] = []
    if m.prompt is not None:
        _check_placeholders(mf, m.prompt, set(names), ("prompt",))
        combos.extend(("matrix", list(parts)) for parts in itertools.product(*groups))
    elif groups:
        raise mf.error(
            "axes, zip or rows are given but there is no prompt template to fill",
            "prompt",
            hint="add prompt: with {placeholders}",
        )
    for i, extra in enumerate(m.tasks):
        if extra.prompt is None and m.prompt is None:
            raise mf.error(
                "this task has no prompt and the manifest has no template",
                "tasks",
                i,
                hint="give the task a prompt: or the manifest a prompt:",
            )
        if extra.prompt is None:
            _check_placeholders(mf, m.prompt or "", set(extra.vars), ("tasks", i, "vars"))
        variant = _Variant(
            values={k: _text(v) for k, v in extra.vars.items()},
            overrides=[(extra.render.set_fields(), ("tasks", i, "render"))],
            prompt=extra.prompt,
            prompt_where=mf.where("tasks", i, "prompt"),
            seed=extra.seed,
            requirements=extra.requirements,
        )
        combos.append((f"tasks[{i}]", [variant]))
    if not combos:
        raise mf.error("the manifest defines no tasks", "campaign", hint="add prompt: (and axes:) or tasks:")
    return combos


def _tasks_of(mf: ManifestFile, source: str, parts: list[_Variant], seeds: list[int]) -> list[Task]:
    """The tasks of one combination: its parts layered in order, one task per seed."""
    m = mf.manifest
    values: dict[str, str] = {}
    layers: list[Layer] = [(m.render.set_fields(), ("render",))]
    prompt_template, prompt_where, seed, wanted = m.prompt, None, None, m.requirements
    for part in parts:
        values.update(part.values)
        layers.extend(part.overrides)
        if part.prompt is not None:
            prompt_template, prompt_where = part.prompt, part.prompt_where
        if part.seed is not None:
            seed = part.seed
        if part.requirements is not None:
            wanted = part.requirements
    if prompt_where is not None:  # a task's or a row's own prompt: its placeholders need values too
        missing = [n for n in _names(prompt_template or "", prompt_where) if n not in values]
        if missing:
            raise error_at(
                prompt_where,
                f"placeholder {{{missing[0]}}} has no value",
                f"add vars: {{{missing[0]}: ...}} (or a column named {missing[0]})",
            )
    settings, provenance = _layer_settings(RenderSettings(), layers, mf)
    for name, problem in mf.constraints.problems(settings.width, settings.height, settings.frames).items():
        origin = provenance[name]
        raise error_at(mf.where(*origin) if isinstance(origin, tuple) else origin, f"{problem} (model {mf.model.spec})")
    prompt = parse_template(prompt_template or "").fill(values)
    settings = replace(settings, negative_prompt=parse_template(settings.negative_prompt).fill(values, default=""))
    variant = tuple(sorted(values.items()))
    needs = Requirements(
        wanted.min_vram_gb if wanted.min_vram_gb is not None else estimate_vram_gb(mf.model, settings),
        wanted.gpu_type,
        wanted.pool,
    )
    return [
        Task(
            compute_task_id(mf.model.identity, Mode.T2V, prompt, settings, s),
            prompt,
            s,
            mf.model,
            settings,
            variant,
            Mode.T2V,
            source,
            needs,
        )
        for s in ([seed] if seed is not None else seeds)
    ]


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _axis_groups(mf: ManifestFile) -> list[list[_Variant]]:
    m = mf.manifest
    groups: list[list[_Variant]] = []
    seen: dict[str, DataPath] = {}

    def claim(name: str, path: DataPath) -> None:
        if not name.isidentifier():
            raise mf.error(
                f"axis name {name!r} cannot be a placeholder",
                *path,
                hint="use letters, digits and '_' (not starting with a digit)",
            )
        if name in seen:
            raise mf.error(
                f"axis {name!r} is also defined at {mf.where(*seen[name]).field}",
                *path,
                hint="give each axis one place",
            )
        seen[name] = path

    for name, entries in m.axes.items():
        claim(name, ("axes", name))
        if not entries:
            raise mf.error(f"axis {name!r} has no values", "axes", name, hint="give at least one value")
        groups.append([_entry_variant(mf, name, e, ("axes", name, i)) for i, e in enumerate(entries)])
    for g, group in enumerate(m.zip):
        if not group:
            raise mf.error("zip group is empty", "zip", g, hint="list axes that vary together")
        lengths = {name: len(entries) for name, entries in group.items()}
        for name in group:
            claim(name, ("zip", g, name))
        if len(set(lengths.values())) != 1:
            detail = ", ".join(f"{n} has {k}" for n, k in lengths.items())
            raise mf.error(
                f"zipped axes must have the same number of values ({detail})",
                "zip",
                g,
                hint="make the lists the same length, or move an axis to axes:",
            )
        if not next(iter(lengths.values())):
            raise mf.error("zipped axes have no values", "zip", g, hint="give at least one value")
        rows = []
        for i in range(next(iter(lengths.values()))):
            merged = _Variant()
            for name, entries in group.items():
                part = _entry_variant(mf, name, entries[i], ("zip", g, name, i))
                merged.values.update(part.values)
                merged.overrides.extend(part.overrides)
            rows.append(merged)
        groups.append(rows)
    return groups


def _entry_variant(mf: ManifestFile, name: str, entry: AxisEntry, path: DataPath) -> _Variant:
    if isinstance(entry, AxisValue):
        return _Variant({name: _text(entry.value)}, [(entry.render.set_fields(), (*path, "render"))])
    return _Variant({name: _text(entry)})


def _rows_group(rows: RowsFile) -> list[_Variant]:
    return [_row_variant(record, rows.where(i)) for i, record in enumerate(rows.records)]


def _row_variant(record: dict[str, Any], where: Where) -> _Variant:
    values: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    variant = _Variant()
    for column, raw in record.items():
        column = str(column).strip()
        cell = raw.strip() if isinstance(raw, str) else raw
        if column in RENDER_FIELDS:
            if cell in ("", None):
                continue
            try:
                overrides.update(RenderOverrides.model_validate({column: cell}).set_fields())
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise error_at(
                    Where(where.file, where.line, f"{where.field} column {column}"),
                    f"{cell!r}: {msg[0].lower()}{msg[1:]}",
                ) from None
        elif column == "seed":
            if cell in ("", None):
                continue
            try:
                variant.seed = int(cell)
                if not 0 <= variant.seed <= SEED_MAX:
                    raise ValueError
            except (TypeError, ValueError):
                raise error_at(
                    Where(where.file, where.line, f"{where.field} column seed"),
                    f"{cell!r} is not a seed",
                    "use a whole number ≥ 0",
                ) from None
        elif column == "prompt":
            if cell not in ("", None):
                variant.prompt, variant.prompt_where = str(cell), where
        else:
            if not column.isidentifier():
                raise error_at(
                    where, f"column {column!r} cannot be a placeholder", "rename it with letters, digits and '_'"
                )
            values[column] = "" if cell is None else _text(cell)
    variant.values = values
    variant.overrides = [(overrides, where)] if overrides else []
    return variant


def _names(template: str, where: Where) -> tuple[str, ...]:
    try:
        return parse_template(template).names
    except TemplateError as exc:
        raise error_at(where, str(exc), "write literal braces as {{ and }}") from None


def _check_placeholders(mf: ManifestFile, template: str, known: set[str], path: DataPath) -> None:
    for name in _names(template, mf.where(*path)):
        if name not in known:
            raise mf.error(
                f"placeholder {{{name}}} has no axis",
                *path,
                hint=f"add axes: {name}: [...] (or a column/var named {name}), or remove {{{name}}}",
            )
    neg = mf.manifest.render.negative_prompt
    if neg and path == ("prompt",):
        for name in _names(neg, mf.where("render", "negative_prompt")):
            if name not in known:
                raise mf.error(
                    f"placeholder {{{name}}} has no axis",
                    "render",
                    "negative_prompt",
                    hint=f"add axes: {name}: [...] or remove {{{name}}}",
                )


def _layer_settings(
    base: RenderSettings, layers: list[Layer], mf: ManifestFile
) -> tuple[RenderSettings, dict[str, Origin]]:
    merged = dict(base.__dict__)
    provenance: dict[str, Origin] = {name: ("model",) for name in RENDER_FIELDS}
    for overrides, origin in layers:
        for name, value in overrides.items():
            merged[name] = value
            provenance[name] = (
                (*origin, name)
                if isinstance(origin, tuple)
                else Where(origin.file, origin.line, f"{origin.field} column {name}")
            )
    return RenderSettings(**merged), provenance
