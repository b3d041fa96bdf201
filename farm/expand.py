"""Expansion: a loaded manifest → its tasks. Pure: it reads no file and starts nothing.

The matrix: every value of each axis × every row of each zip group × every row of the rows file
× every seed, plus explicit tasks. Render settings layer: the defaults (``RenderSettings()``) <
the manifest's ``render`` < axis values (in order of declaration) < row columns < an explicit
task's own ``render``. Identical tasks (same task id) collapse into one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from farm.conditions import Conditions, Layered, Resolved
from farm.config import MAX_TASKS
from farm.manifest import (
    CONDITIONING_FIELDS,
    RENDER_FIELDS,
    SEED_MAX,
    AxisEntry,
    AxisValue,
    ConditioningKeys,
    ManifestFile,
    RenderOverrides,
    RequirementsSpec,
    RowsFile,
    Scalar,
    SeedRange,
    Where,
    conditioning_of,
    error_at,
)
from farm.models import estimate_vram_gb, prompt_token_counter
from farm.task import Conditioning, RenderSettings, Requirements, Task, compute_task_id
from farm.template import Template, TemplateError, parse_template
from farm.yamlfile import DataPath

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

    @property
    def plain(self) -> bool:
        """Only placeholder values: nothing of the manifest's prompt, settings or seeds changes."""
        return not self.overrides and self.prompt is None and self.seed is None and self.requirements is None


@dataclass(frozen=True)
class Expansion:
    tasks: list[Task]
    expanded: int  # tasks before identical ones collapsed


@dataclass(frozen=True)
class Count:
    tasks: int  # distinct tasks
    expanded: int  # before identical ones collapsed


@dataclass(frozen=True)
class _Combination:
    """One combination, resolved: what its tasks share. One task per seed in ``seeds``."""

    source: str  # where it came from, for messages: "matrix" or "tasks[i]"
    values: dict[str, str]
    prompt: str
    settings: RenderSettings
    needs: Requirements
    seeds: Sequence[int]
    prompt_where: Where  # where its prompt and negative prompt were written, for messages
    negative_where: Where
    resolved: Resolved  # its mode and inputs


@dataclass(frozen=True)
class _Layered:
    """What a set of overriding parts makes of the manifest's render settings and requirements."""

    settings: RenderSettings
    needs: Requirements
    negative: Template  # the negative prompt, still to fill per combination
    negative_where: Where
    conditioning: Layered  # mode and inputs, input paths still to fill per combination


Inspect = Callable[[str], Any]  # an input's URI → its InputInfo (farm/inputs.py)


def _inspector(mf: ManifestFile, inspect: Inspect | None) -> Inspect:
    if inspect is not None:
        return inspect
    from farm.inputs import InputInspector

    return InputInspector(mf.target.options)


def expand(mf: ManifestFile, inspect: Inspect | None = None) -> Expansion:
    """Expand a manifest into its tasks (deterministic order; identical tasks collapse).
    ``inspect``: how inputs are read (default: from disk or S3, each URI once)."""
    if mf.manifest.sequence is not None:
        from farm.sequence.plan import expand_sequences

        conditions = Conditions(mf, _inspector(mf, inspect))
        return expand_sequences(mf, _resolved(mf, conditions), conditions)
    tasks: dict[str, Task] = {}
    expanded = 0
    for c in _resolved(mf, Conditions(mf, _inspector(mf, inspect))):
        variant = tuple(sorted(c.values.items()))
        r = c.resolved
        mode = r.conditioning.mode
        for seed in c.seeds:
            expanded += 1
            task_id = compute_task_id(r.identity, mode, c.prompt, c.settings, seed, r.hashed_inputs, r.hashed)
            if task_id not in tasks:
                tasks[task_id] = Task(
                    task_id,
                    c.prompt,
                    seed,
                    mf.model,
                    c.settings,
                    variant,
                    r.conditioning,
                    c.source,
                    c.needs,
                    r.inputs,
                )
    return Expansion(list(tasks.values()), expanded)


def count(mf: ManifestFile, inspect: Inspect | None = None) -> Count:
    """How many distinct tasks the manifest makes, checking everything ``expand`` checks, without
    making a Task (or hashing a task id) per task: what ``farm validate`` needs, at a fraction of
    the time and memory on a million tasks. A task is told apart by its prompt, settings, seed
    and what its task id hashes of its mode and inputs."""
    if mf.manifest.sequence is not None:  # a sequence's tasks hash their parents': counted by planning them
        planned = expand(mf, inspect)
        return Count(len(planned.tasks), planned.expanded)
    seen: set[tuple[Any, ...]] = set()
    expanded = 0
    for c in _resolved(mf, Conditions(mf, _inspector(mf, inspect))):
        expanded += len(c.seeds)
        key = c.resolved.key
        seen.update((c.prompt, c.settings, seed, key) for seed in c.seeds)
    return Count(len(seen), expanded)


def _seeds(mf: ManifestFile) -> Sequence[int]:
    m = mf.manifest
    seeds = range(m.seeds.base, m.seeds.base + m.seeds.count) if isinstance(m.seeds, SeedRange) else m.seeds
    if not seeds:
        raise mf.error("no seeds given", "seeds", hint="give a list such as [0, 1] or {count: 2}")
    if seeds[-1] > SEED_MAX:  # a range's base may be in range while its last seed is not
        raise mf.error(
            f"the last seed, {seeds[-1]}, is over the largest seed {SEED_MAX}",
            "seeds",
            "base",
            hint="lower base: or count:",
        )
    return seeds


def _resolved(mf: ManifestFile, conditions: Conditions) -> Iterator[_Combination]:
    """Every combination of the matrix, then every explicit task, resolved. The task count is
    checked against FARM_MAX_TASKS before the first one is made. With a ``sequence:`` the
    combinations have no prompt: each is one sequence, its shots' prompts filled from its values."""
    m = mf.manifest
    seeds = _seeds(mf)
    groups = _axis_groups(mf) + ([_rows_group(mf.rows)] if mf.rows is not None else [])
    if m.sequence is not None:
        if m.prompt is not None:
            raise mf.error(
                "a sequence's prompts are its shots' prompts", "prompt", hint="move it into sequence: shots:"
            )
        m = m.model_copy(update={"prompt": ""})
    if m.prompt is None and groups:
        raise mf.error(
            "axes, zip or rows are given but there is no prompt template to fill",
            "prompt",
            hint="add prompt: with {placeholders}",
        )
    explicit = _explicit_tasks(mf)
    if m.prompt is None and not explicit:
        raise mf.error("the manifest defines no tasks", "campaign", hint="add prompt: (and axes:) or tasks:")
    _check_task_count(mf, groups, explicit, seeds)
    layering = _Layering(mf, conditions)
    length = PromptLength(mf)
    if m.prompt is not None:
        if m.sequence is None:
            _check_placeholders(mf, m.prompt, {n for _, g in groups for n in g[0].values}, ("prompt",))
        template, prompt_where = parse_template(m.prompt), mf.where("prompt")
        plain: _Layered | None = None  # worked out at the first plain combination: every part may override
        for parts in itertools.product(*(g for _, g in groups)):
            values: dict[str, str] = {}
            all_plain = True
            for part in parts:
                values.update(part.values)
                all_plain = all_plain and part.plain
            if all_plain:  # the common case, kept cheap: the manifest's prompt, settings and seeds
                plain = plain or layering.of([])
                settings = plain.settings
                if plain.negative.names:
                    settings = replace(settings, negative_prompt=plain.negative.fill(values, default=""))
                combination = _Combination(
                    "matrix",
                    values,
                    template.fill(values),
                    settings,
                    plain.needs,
                    seeds,
                    prompt_where,
                    plain.negative_where,
                    conditions.resolve(plain.conditioning, values, settings),
                )
            else:
                combination = layering.combination("matrix", list(parts), values, seeds, m.prompt)
            length.check(combination)
            yield combination
    for source, part in explicit:
        combination = layering.combination(source, [part], dict(part.values), seeds, m.prompt)
        length.check(combination)
        yield combination


def _explicit_tasks(mf: ManifestFile) -> list[tuple[str, _Variant]]:
    m = mf.manifest
    out = []
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
            overrides=_layers(extra, ("tasks", i)),
            prompt=extra.prompt,
            prompt_where=mf.where("tasks", i, "prompt"),
            seed=extra.seed,
            requirements=extra.requirements,
        )
        out.append((f"tasks[{i}]", variant))
    return out


def _check_task_count(
    mf: ManifestFile, groups: list[Group], explicit: list[tuple[str, _Variant]], seeds: Sequence[int]
) -> None:
    """Refuse more than FARM_MAX_TASKS tasks, counted from the sizes that multiply, before any is made."""
    sizes = [(label, len(parts)) for label, parts in groups if parts]
    matrix, own_seed = 0, 0
    if mf.manifest.prompt is not None or mf.manifest.sequence is not None:
        matrix = math.prod(n for _, n in sizes) * len(seeds) * _tasks_per_combination(mf)
        if mf.rows is not None:  # a row with its own seed makes one task, not one per seed
            own_seed = sum(1 for p in groups[-1][1] if p.seed is not None)
            matrix -= matrix // len(groups[-1][1]) // len(seeds) * own_seed * (len(seeds) - 1)
    total = matrix + sum(1 if part.seed is not None else len(seeds) for _, part in explicit)
    if total > MAX_TASKS:
        factors = " × ".join([f"{label} {n:,}" for label, n in sizes] + [f"seeds {len(seeds):,}"])
        if own_seed:
            factors += f", {own_seed:,} rows with their own seed once"
        if explicit:
            factors += f", + {len(explicit):,} explicit tasks"
        raise mf.error(
            f"the manifest makes {total:,} tasks ({factors}), more than FARM_MAX_TASKS={MAX_TASKS:,}",
            "campaign",
            hint="use fewer values, or raise FARM_MAX_TASKS if you mean it",
        )


def _tasks_per_combination(mf: ManifestFile) -> int:
    if mf.manifest.sequence is None:
        return 1
    from farm.sequence.plan import tasks_per_sequence

    return tasks_per_sequence(mf.manifest.sequence)


class PromptLength:
    """Refuse a prompt (or negative prompt) longer than the model's text encoder reads: diffusers
    would cut the rest off without a word, and the end of an ad prompt is its call to action."""

    def __init__(self, mf: ManifestFile) -> None:
        self.mf = mf
        counter = prompt_token_counter(mf.model)
        self.tokens: Callable[[str], int] | None = counter[0] if counter else None
        self.limit = counter[1] if counter else 0

    def check(self, c: _Combination) -> None:
        for text, what, where in (
            (c.prompt, "prompt", c.prompt_where),
            (c.settings.negative_prompt, "negative prompt", c.negative_where),
        ):
            self.check_text(text, what, where, c.values)

    def check_text(self, text: str, what: str, where: Where, values: dict[str, str]) -> None:
        """Refuse ``text`` (a ``what``: "prompt", "negative prompt") written at ``where``."""
        if self.tokens is not None and len(text) * 4 + 2 > self.limit:  # UTF-8: ≤ 4 bytes a character
            count = self.tokens(text)
            if count > self.limit:
                shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
                raise error_at(
                    where,
                    f"the {what}{f' for {shown}' if shown else ''} is {count} tokens, more than the {self.limit} "
                    f"tokens model {self.mf.model.spec}'s text encoder reads (the rest would be cut off without a "
                    "word)",
                    "shorten it: the end, often the call to action, is what would be lost"
                    if what == "prompt"
                    else "shorten it",
                )


class _Layering:
    """Render settings and requirements of a combination: the manifest's own layered with each
    part's overrides, computed once per distinct set of overriding parts."""

    def __init__(self, mf: ManifestFile, conditions: Conditions) -> None:
        self.mf = mf
        self.conditions = conditions
        self.base: list[Layer] = [(mf.manifest.render.set_fields(), ("render",)), (conditioning_of(mf.manifest), ())]
        self.cache: dict[tuple[int, ...], _Layered] = {}

    def of(self, parts: list[_Variant]) -> _Layered:
        key = tuple(id(p) for p in parts if p.overrides or p.requirements is not None)
        if key not in self.cache:
            layers = [*self.base, *(layer for p in parts for layer in p.overrides)]
            settings, conditioning, provenance = _layer_settings(layers, self.mf)
            where = {name: self.mf.where(*o) if isinstance(o, tuple) else o for name, o in provenance.items()}
            for name, problem in self.mf.constraints.problems(settings.width, settings.height, settings.frames).items():
                raise error_at(where[name], f"{problem} (model {self.mf.model.spec})")
            wanted = self.mf.manifest.requirements
            for p in parts:
                wanted = p.requirements if p.requirements is not None else wanted
            vram = wanted.min_vram_gb if wanted.min_vram_gb is not None else estimate_vram_gb(self.mf.model, settings)
            try:
                negative = parse_template(settings.negative_prompt)
            except TemplateError as exc:
                raise error_at(where["negative_prompt"], str(exc), "write literal braces as {{ and }}") from None
            needs = Requirements(vram, wanted.gpu_type, wanted.pool)
            layered = self.conditions.layered(conditioning, where)
            self.cache[key] = _Layered(settings, needs, negative, where["negative_prompt"], layered)
        return self.cache[key]

    def combination(
        self, source: str, parts: list[_Variant], values: dict[str, str], seeds: Sequence[int], template: str | None
    ) -> _Combination:
        """A combination with a part that overrides something: settings, prompt, seed or needs."""
        prompt_template, prompt_where, seed = template, None, None
        for part in parts:
            if part.prompt is not None:
                prompt_template, prompt_where = part.prompt, part.prompt_where
            if part.seed is not None:
                seed = part.seed
        if prompt_where is not None:  # a task's or a row's own prompt: its placeholders need values too
            missing = [n for n in _names(prompt_template or "", prompt_where) if n not in values]
            if missing:
                raise error_at(
                    prompt_where,
                    f"placeholder {{{missing[0]}}} has no value",
                    f"add vars: {{{missing[0]}: ...}} (or a column named {missing[0]})",
                )
        layered = self.of(parts)
        settings = replace(layered.settings, negative_prompt=layered.negative.fill(values, default=""))
        prompt = parse_template(prompt_template or "").fill(values)
        seeds = [seed] if seed is not None else seeds
        where = prompt_where or self.mf.where("prompt")
        resolved = self.conditions.resolve(layered.conditioning, values, settings)
        return _Combination(
            source, values, prompt, settings, layered.needs, seeds, where, layered.negative_where, resolved
        )


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


Group = tuple[str, list[_Variant]]  # (what it is, for messages: "product", "zip[0]", "rows"; its parts)


def _axis_groups(mf: ManifestFile) -> list[Group]:
    m = mf.manifest
    groups: list[Group] = []
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
        groups.append((name, [_entry_variant(mf, name, e, ("axes", name, i)) for i, e in enumerate(entries)]))
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
        groups.append((f"zip[{g}]", rows))
    return groups


def _layers(entry: AxisValue | Any, path: DataPath) -> list[Layer]:
    """An axis value's or a task's overrides: its render: keys and its conditioning keys."""
    out: list[Layer] = []
    if overrides := entry.render.set_fields():
        out.append((overrides, (*path, "render")))
    if conditioning := conditioning_of(entry):
        out.append((conditioning, path))
    return out


def _entry_variant(mf: ManifestFile, name: str, entry: AxisEntry, path: DataPath) -> _Variant:
    if isinstance(entry, AxisValue):
        return _Variant({name: _text(entry.value)}, _layers(entry, path))
    return _Variant({name: _text(entry)})


def _rows_group(rows: RowsFile) -> Group:
    return ("rows", [_row_variant(record, rows.where(i)) for i, record in enumerate(rows.records)])


def _row_variant(record: dict[str, Any], where: Where) -> _Variant:
    values: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    variant = _Variant()
    for column, raw in record.items():
        column = str(column).strip()
        cell = raw.strip() if isinstance(raw, str) else raw
        if column in RENDER_FIELDS or column in CONDITIONING_FIELDS:
            if cell in ("", None):
                continue
            schema = RenderOverrides if column in RENDER_FIELDS else ConditioningKeys
            try:
                overrides.update(schema.model_validate({column: cell}).set_fields())
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


def _layer_settings(layers: list[Layer], mf: ManifestFile) -> tuple[RenderSettings, Conditioning, dict[str, Origin]]:
    """The render settings and the conditioning the layers make, over the defaults, and where each
    value was set (a value never set points at the model: its default applies)."""
    merged: dict[str, Any] = {**RenderSettings().__dict__, **Conditioning().__dict__}
    provenance: dict[str, Origin] = {name: ("model",) for name in (*RENDER_FIELDS, *CONDITIONING_FIELDS)}
    for overrides, origin in layers:
        for name, value in overrides.items():
            merged[name] = value
            provenance[name] = (
                (*origin, name)
                if isinstance(origin, tuple)
                else Where(origin.file, origin.line, f"{origin.field} column {name}")
            )
    settings = RenderSettings(**{k: merged[k] for k in RENDER_FIELDS})
    return settings, Conditioning(**{k: merged[k] for k in CONDITIONING_FIELDS}), provenance
