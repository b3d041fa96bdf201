"""Manifests: the pydantic schema, YAML loading with line-numbered errors, matrix expansion.

A manifest is untrusted input, validated once here. Every error names the file, the line and
the field, and says how to fix it.

The matrix: every value of each axis × every row of each zip group × every row of the rows file
× every seed, plus explicit tasks. Render settings layer: manifest ``render`` < axis values (in
order of declaration) < row columns < an explicit task's own ``render``.
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.config import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_MODEL,
    DEFAULT_RETRIES,
    DEFAULT_STEPS,
    DEFAULT_TASK_TIMEOUT_S,
    DEFAULT_WIDTH,
    outputs_dir,
)
from farm.errors import FarmError, ManifestError
from farm.models import constraints_for, estimate_vram_gb, resolve_model
from farm.storage import OutputTarget, StorageOptions, check_output
from farm.task import ModelRef, RenderSettings, Requirements, Task, compute_task_id

Scalar = str | int | float | bool
RENDER_FIELDS = ("width", "height", "frames", "fps", "steps", "guidance", "negative_prompt")
ROW_RESERVED = {*RENDER_FIELDS, "prompt", "seed"}
CAMPAIGN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
SEED_MAX = 2**63 - 1


class RenderOverrides(BaseModel):
    """Render settings; any of them may be left out to inherit from the layer below."""

    model_config = ConfigDict(extra="forbid")

    width: Annotated[int, Field(gt=0, le=8192)] | None = None
    height: Annotated[int, Field(gt=0, le=8192)] | None = None
    frames: Annotated[int, Field(gt=0, le=10000)] | None = None
    fps: Annotated[int, Field(gt=0, le=240)] | None = None
    steps: Annotated[int, Field(gt=0, le=1000)] | None = None
    guidance: Annotated[float, Field(ge=0, le=100)] | None = None
    negative_prompt: str | None = None

    def set_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AxisValue(BaseModel):
    """An axis value that also changes render settings, e.g. a platform's aspect ratio::

    platform:
      - value: tiktok
        render: {width: 48, height: 80}
    """

    model_config = ConfigDict(extra="forbid")

    value: Scalar
    render: RenderOverrides = RenderOverrides()


AxisEntry = Scalar | AxisValue


class SeedRange(BaseModel):
    """``seeds: {count: 4, base: 1000}`` → seeds 1000, 1001, 1002, 1003."""

    model_config = ConfigDict(extra="forbid")

    count: Annotated[int, Field(gt=0, le=100000)]
    base: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0


class RequirementsSpec(BaseModel):
    """What renderers may take a task: at least this much GPU memory, this GPU type, this pool.
    Without ``min_vram_gb`` farm estimates it from the model and the clip's size."""

    model_config = ConfigDict(extra="forbid")

    min_vram_gb: Annotated[float, Field(ge=0, le=4096)] | None = None
    gpu_type: str | None = None
    pool: str | None = None


class ExtraTask(BaseModel):
    """A hand-written task: its own prompt (or the template filled from ``vars``), seed, settings."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    vars: dict[str, Scalar] = {}
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    render: RenderOverrides = RenderOverrides()
    requirements: RequirementsSpec | None = None


class RowsSource(BaseModel):
    """A CSV or Parquet file, one variant a row: columns fill placeholders; columns named
    ``prompt``, ``seed`` or a render setting override those for that row."""

    model_config = ConfigDict(extra="forbid")

    path: str


class StorageSettings(BaseModel):
    """How to reach an S3-compatible store for ``output: s3://…``. Credentials are never set here:
    they come from boto3's usual chain (environment, ``profile``, instance role)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    multipart_threshold_mb: Annotated[int, Field(ge=5, le=5120)] = 64
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    campaign: str
    model: str = DEFAULT_MODEL
    prompt: str | None = None
    render: RenderOverrides = RenderOverrides()
    axes: dict[str, list[AxisEntry]] = {}
    zip: list[dict[str, list[AxisEntry]]] = []
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] | SeedRange = [0]
    tasks: list[ExtraTask] = []
    rows: str | RowsSource | None = None
    output: str | None = None
    storage: StorageSettings = StorageSettings()
    retries: Annotated[int, Field(ge=0, le=100)] = DEFAULT_RETRIES
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0  # higher goes first across jobs
    timeout_s: Annotated[float, Field(gt=0, le=86400)] = DEFAULT_TASK_TIMEOUT_S  # per attempt
    requirements: RequirementsSpec = RequirementsSpec()
    # When the whole job should be done: a duration from submission ("6h", "90m", 3600) or a
    # time with its zone ("2027-03-01T09:00:00+01:00"). The controller scales pools toward it.
    deadline: str | float | None = None

    @field_validator("deadline", mode="before")
    @classmethod
    def _yaml_timestamp_as_text(cls, value: object) -> object:
        # YAML reads an unquoted 2027-03-01T09:00:00+01:00 as a datetime (and 2027-03-01 as a date).
        return value.isoformat() if isinstance(value, date) else value

    @field_validator("deadline")
    @classmethod
    def _deadline_parses(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            deadline_seconds(value, datetime.now(UTC))
        return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_S = 366 * 86400


def deadline_seconds(value: str | float, now: datetime) -> float:
    """Seconds from ``now`` to a manifest's ``deadline`` (a duration, or a time with its zone).
    A time already past gives a negative number, not an error: re-submitting a late campaign to
    resume it must still work (the plan then says the deadline has passed)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{value} is not a number of seconds: give e.g. 3600 or 6h")
    else:
        match = _DURATION.match(str(value))
        if match:
            seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
        else:
            try:
                at = datetime.fromisoformat(str(value))
            except ValueError:
                raise ValueError(f"{value!r} is neither a duration nor a time: write e.g. 6h, 90m, 3600 or "
                                 "2027-03-01T09:00:00+01:00") from None
            if at.tzinfo is None:
                raise ValueError(f"{value!r} has no time zone: add one, e.g. {at.isoformat()}+00:00")
            return (at - now).total_seconds()
    if seconds <= 0:
        raise ValueError("must be positive: give a duration such as 6h or a future time")
    if seconds > _MAX_DURATION_S:
        raise ValueError(f"{value} is more than a year: give a shorter duration, or a time such as "
                         "2027-03-01T09:00:00+01:00")
    return seconds


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Where:
    """A place in the manifest (or in a rows file) that set a value: for error messages."""

    file: str
    line: int | None
    field: str


@dataclass
class ManifestFile:
    """A validated manifest and everything needed to point back into its text."""

    manifest: Manifest
    path: Path
    text: str
    lines: dict[tuple, int]
    model: ModelRef
    target: OutputTarget

    @property
    def output(self) -> str:
        return self.target.uri

    def where(self, *data_path: Any) -> Where:
        return Where(str(self.path), _line_of(self.lines, data_path), _field_name(data_path))

    def error(self, message: str, *data_path: Any, hint: str | None = None) -> ManifestError:
        return _error_at(self.where(*data_path), message, hint)

    @property
    def max_attempts(self) -> int:
        return self.manifest.retries + 1


def load_manifest(path: str | Path, output_override: str | None = None) -> ManifestFile:
    """Read, parse and validate a manifest file. Raises ManifestError with file:line: field."""
    path = Path(path)
    shown = str(path)
    if not path.exists():
        raise ManifestError(f"manifest {shown} does not exist", hint="check the path")
    if path.is_dir():
        raise ManifestError(f"{shown} is a directory", hint="give the manifest's .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {shown}: {exc}") from None
    data, lines = _parse_yaml(text, shown)
    if not isinstance(data, dict):
        raise ManifestError(
            "a manifest must be a YAML mapping (campaign:, prompt:, axes:, …)", file=shown, line=1
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc, data, lines, shown) from None
    base_dir = path.resolve().parent
    where = lambda *p: Where(shown, _line_of(lines, p), _field_name(p))  # noqa: E731
    if not CAMPAIGN_NAME.match(manifest.campaign):
        raise _error_at(
            where("campaign"),
            f"{manifest.campaign!r} is not a valid campaign name",
            "use letters, digits, '-', '_' or '.', starting with a letter or digit (at most 80)",
        )
    try:
        model = resolve_model(manifest.model, base_dir)
    except FarmError as exc:
        raise _error_at(where("model"), exc.message, exc.hint) from None
    if output_override is not None:
        output, output_where = _resolve_output(output_override, Path.cwd()), Where(shown, None, "--output")
    elif manifest.output is not None:
        output, output_where = _resolve_output(manifest.output, base_dir), where("output")
    else:
        output, output_where = str(outputs_dir() / manifest.campaign), where("campaign")
    try:
        check_output(output)
    except FarmError as exc:
        raise _error_at(output_where, exc.message, exc.hint) from None
    st = manifest.storage
    options = StorageOptions(endpoint_url=st.endpoint_url, region=st.region, profile=st.profile,
                             multipart_threshold_mb=st.multipart_threshold_mb, max_attempts=st.max_attempts)
    return ManifestFile(manifest, path, text, lines, model, OutputTarget(output, options))


def _resolve_output(value: str, base_dir: Path) -> str:
    if "://" in value:
        return value.rstrip("/")
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base_dir / path).resolve())


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestError(
            f"YAML syntax error: {problem}",
            file=file,
            line=mark.line + 1 if mark else None,
            hint="fix the indentation or quoting on that line",
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"YAML error: {exc}", file=file) from None
    if root is None:
        raise ManifestError("the manifest is empty", file=file, hint="start from manifests/demo.yaml")
    lines: dict[tuple, int] = {}
    _index_lines(root, (), lines, file)
    return data, lines


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ManifestError(
                    f"key {key!r} appears twice",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    field=_field_name((*path, key)),
                    hint="keep one of them",
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines, file)


def _line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    for end in range(len(path), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in path[:end])
        if key in lines:
            return lines[key]
    return None


def _field_name(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_at(where: Where, message: str, hint: str | None = None) -> ManifestError:
    return ManifestError(message, file=where.file, line=where.line, field=where.field or None, hint=hint)


def _data_path(loc: tuple, data: Any) -> tuple[tuple, bool]:
    """Map a pydantic error location onto the data, dropping union-branch tags.
    Returns (path, whether the last component was found in the data)."""
    path: list = []
    current = data
    found = True
    for part in loc:
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and part < len(current)
        if in_dict or in_list:
            path.append(part)
            current = current[part]
            found = True
        else:
            found = False
    return tuple(path), found


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at the mapping where ``loc`` points, walking the schema's types."""
    candidates: list = [Manifest]
    for part in loc:
        nxt: list = []
        for tp in candidates:
            nxt.extend(_step_type(tp, part))
        candidates = nxt
    names: list[str] = []
    for tp in candidates:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names.extend(n for n in tp.model_fields if n not in names)
    return names


def _step_type(tp: Any, part: Any) -> list:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _step_type(typing.get_args(tp)[0], part)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in _step_type(arg, part)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field_info = tp.model_fields.get(part)
        return [field_info.annotation] if field_info else []
    if origin is list and isinstance(part, int):
        return [typing.get_args(tp)[0]]
    if origin is dict:
        return [typing.get_args(tp)[1]]
    return []


def _pydantic_error(exc: ValidationError, data: Any, lines: dict[tuple, int], file: str) -> ManifestError:
    # With unions pydantic reports one error per branch: the one reaching deepest into the
    # data is the one about what the user meant.
    best = max(exc.errors(), key=lambda e: len(_data_path(e["loc"], data)[0]))
    path, found = _data_path(best["loc"], data)
    kind = best["type"]
    hint = None
    if kind == "extra_forbidden":
        allowed = [k for k in _allowed_keys(path[:-1]) if k != path[-1]]
        message = f"unknown key {path[-1]!r}"
        hint = "allowed here: " + ", ".join(allowed) if allowed else "remove it"
    elif kind == "missing":
        missing = best["loc"][-1]
        path = (*path, missing) if not found else path
        message = f"missing required key {missing!r}"
        hint = f"add {missing}: to the manifest"
    elif kind == "value_error":  # our own validators already say what was wrong with the value
        message = str(best["ctx"]["error"]) if "ctx" in best else best["msg"]
    else:
        message = best["msg"]
        if "input" in best and not isinstance(best["input"], dict | list):
            message = f"{best['input']!r}: {message[0].lower()}{message[1:]}"
    return ManifestError(
        message, file=file, line=_line_of(lines, path), field=_field_name(path) or None, hint=hint
    )


# ----------------------------------------------------------------------------- expansion


@dataclass
class _Variant:
    """Part of a combination: placeholder values and render overrides, each with where it came from."""

    values: dict[str, str] = field(default_factory=dict)
    # Render overrides with where they were set: a manifest path, or a place in a rows file.
    overrides: list[tuple[dict[str, Any], tuple | Where]] = field(default_factory=list)
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
    base = RenderSettings(
        width=DEFAULT_WIDTH,
        height=DEFAULT_HEIGHT,
        frames=DEFAULT_FRAMES,
        fps=DEFAULT_FPS,
        steps=DEFAULT_STEPS,
        guidance=DEFAULT_GUIDANCE,
        negative_prompt="",
    )
    base_layer = (m.render.set_fields(), ("render",))
    seeds = list(range(m.seeds.base, m.seeds.base + m.seeds.count)) if isinstance(m.seeds, SeedRange) else m.seeds
    if not seeds:
        raise mf.error("no seeds given", "seeds", hint="give a list such as [0, 1] or {count: 2}")

    groups = _axis_groups(mf) + ([_rows_group(mf)] if m.rows is not None else [])
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
            raise mf.error("this task has no prompt and the manifest has no template", "tasks", i,
                           hint="give the task a prompt: or the manifest a prompt:")
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

    constraints = constraints_for(mf.model)
    tasks: dict[str, Task] = {}
    expanded = 0
    for source, parts in combos:
        values: dict[str, str] = {}
        layers = [base_layer]
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
            missing = [n for n in _template_names(prompt_template or "", prompt_where) if n not in values]
            if missing:
                raise _error_at(prompt_where, f"placeholder {{{missing[0]}}} has no value",
                                f"add vars: {{{missing[0]}: ...}} (or a column named {missing[0]})")
        settings, provenance = _layer_settings(base, layers, mf)
        for name, problem in constraints.problems(settings.width, settings.height, settings.frames).items():
            origin = provenance[name]
            where = mf.where(*origin) if isinstance(origin, tuple) else origin
            raise _error_at(where, f"{problem} (model {mf.model.spec})")
        prompt = _fill(prompt_template or "", values)
        negative = _fill(settings.negative_prompt, values)
        if negative != settings.negative_prompt:
            settings = RenderSettings(**{**settings.__dict__, "negative_prompt": negative})
        variant = tuple(sorted(values.items()))
        needs = Requirements(
            wanted.min_vram_gb if wanted.min_vram_gb is not None else estimate_vram_gb(mf.model, settings),
            wanted.gpu_type, wanted.pool)
        for s in [seed] if seed is not None else seeds:
            expanded += 1
            task_id = compute_task_id(mf.model.identity, "t2v", prompt, settings, s)
            if task_id not in tasks:
                tasks[task_id] = Task(task_id, prompt, s, mf.model, settings, variant, "t2v", source, needs)
    return Expansion(list(tasks.values()), expanded)


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _axis_groups(mf: ManifestFile) -> list[list[_Variant]]:
    m = mf.manifest
    groups: list[list[_Variant]] = []
    seen: dict[str, tuple] = {}

    def claim(name: str, path: tuple) -> None:
        if not name.isidentifier():
            raise mf.error(f"axis name {name!r} cannot be a placeholder", *path,
                           hint="use letters, digits and '_' (not starting with a digit)")
        if name in seen:
            raise mf.error(f"axis {name!r} is also defined at {mf.where(*seen[name]).field}", *path,
                           hint="give each axis one place")
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
            raise mf.error(f"zipped axes must have the same number of values ({detail})", "zip", g,
                           hint="make the lists the same length, or move an axis to axes:")
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


def _entry_variant(mf: ManifestFile, name: str, entry: AxisEntry, path: tuple) -> _Variant:
    if isinstance(entry, AxisValue):
        return _Variant({name: _text(entry.value)}, [(entry.render.set_fields(), (*path, "render"))])
    return _Variant({name: _text(entry)})


def _rows_group(mf: ManifestFile) -> list[_Variant]:
    rows = mf.manifest.rows
    spec = rows.path if isinstance(rows, RowsSource) else rows
    field_path = ("rows", "path") if isinstance(rows, RowsSource) else ("rows",)
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = mf.path.resolve().parent / path
    if not path.is_file():
        raise mf.error(f"rows file {path} does not exist", *field_path,
                       hint="give a CSV or Parquet file path relative to the manifest")
    if path.suffix.lower() == ".parquet":
        records, first_line = _read_parquet_rows(path, mf, field_path), 0
    elif path.suffix.lower() in (".csv", ".tsv"):
        records, first_line = _read_csv_rows(path, mf, field_path), 2
    else:
        raise mf.error(f"rows file {path.name} is neither .csv nor .parquet", *field_path,
                       hint="convert it to CSV or Parquet")
    if not records:
        raise mf.error(f"rows file {path} has no rows", *field_path, hint="add rows or remove rows:")
    variants = []
    for i, record in enumerate(records):
        line = first_line + i if first_line else None
        label = f"row {i + 1}" if line is None else "row"
        variants.append(_row_variant(record, Where(str(path), line, label)))
    return variants


def _read_csv_rows(path: Path, mf: ManifestFile, field_path: tuple) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise mf.error(f"cannot read rows file {path}: {exc}", *field_path) from None
    if reader.fieldnames is None:
        raise mf.error(f"rows file {path} has no header row", *field_path, hint="add column names")
    for n, record in enumerate(records):
        if None in record:
            raise ManifestError("this row has more cells than the header has columns", file=str(path),
                                line=n + 2, hint="quote cells that contain the delimiter")
    return records


def _read_parquet_rows(path: Path, mf: ManifestFile, field_path: tuple) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise mf.error(f"cannot read rows file {path}: {exc}", *field_path) from None


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
                raise _error_at(Where(where.file, where.line, f"{where.field} column {column}"),
                                f"{cell!r}: {msg[0].lower()}{msg[1:]}") from None
        elif column == "seed":
            if cell in ("", None):
                continue
            try:
                variant.seed = int(cell)
                if not 0 <= variant.seed <= SEED_MAX:
                    raise ValueError
            except (TypeError, ValueError):
                raise _error_at(Where(where.file, where.line, f"{where.field} column seed"),
                                f"{cell!r} is not a seed", "use a whole number ≥ 0") from None
        elif column == "prompt":
            if cell not in ("", None):
                variant.prompt, variant.prompt_where = str(cell), where
        else:
            if not column.isidentifier():
                raise _error_at(where, f"column {column!r} cannot be a placeholder",
                                "rename it with letters, digits and '_'")
            values[column] = "" if cell is None else _text(cell)
    variant.values = values
    variant.overrides = [(overrides, where)] if overrides else []
    return variant


def _placeholders(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template: {exc}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}}} must be a plain name like {{product}}")
        names.append(name)
    return names


@functools.cache
def _template_names_cached(template: str) -> tuple[str, ...]:
    return tuple(_placeholders(template))


def _template_names(template: str, where: Where) -> tuple[str, ...]:
    try:
        return _template_names_cached(template)
    except ValueError as exc:
        raise _error_at(where, str(exc), "write literal braces as {{ and }}") from None


def _check_placeholders(mf: ManifestFile, template: str, known: set[str], path: tuple) -> None:
    try:
        names = _placeholders(template)
    except ValueError as exc:
        raise mf.error(str(exc), *path, hint="write literal braces as {{ and }}") from None
    for name in names:
        if name not in known:
            raise mf.error(
                f"placeholder {{{name}}} has no axis",
                *path,
                hint=f"add axes: {name}: [...] (or a column/var named {name}), or remove {{{name}}}",
            )
    neg = mf.manifest.render.negative_prompt
    if neg and path == ("prompt",):
        try:
            for name in _placeholders(neg):
                if name not in known:
                    raise mf.error(f"placeholder {{{name}}} has no axis", "render", "negative_prompt",
                                   hint=f"add axes: {name}: [...] or remove {{{name}}}")
        except ValueError as exc:
            raise mf.error(str(exc), "render", "negative_prompt") from None


def _fill(template: str, values: dict[str, str]) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values.get(name, ""))
    return "".join(out)


def _layer_settings(
    base: RenderSettings, layers: list[tuple[dict[str, Any], tuple | Where]], mf: ManifestFile
) -> tuple[RenderSettings, dict[str, tuple | Where]]:
    merged = dict(base.__dict__)
    provenance: dict[str, tuple | Where] = {name: ("model",) for name in RENDER_FIELDS}
    for overrides, origin in layers:
        for name, value in overrides.items():
            merged[name] = value
            provenance[name] = (*origin, name) if isinstance(origin, tuple) else Where(
                origin.file, origin.line, f"{origin.field} column {name}")
    return RenderSettings(**merged), provenance
