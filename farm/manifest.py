"""Manifests: the schema, YAML loading with line-numbered errors, and each value parsed once.

A manifest is untrusted input, validated once here. Every error names the file, the line and
the field, and says how to fix it. What comes out is a ``ManifestFile`` of typed values: the
resolved model and its size limits, the output target with its storage options, the deadline,
the rows file's records. Expansion into tasks (``expand.py``) works on those and reads nothing.

The ``render:``, ``requirements:`` and ``storage:`` keys are not listed here: they are the fields
of ``RenderSettings``, ``Requirements`` and ``StorageOptions``, with the bounds their metadata
states (``_optional_fields_of``).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import re
import types
import typing
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from farm import yamlfile
from farm.config import (
    DEFAULT_MODEL,
    DEFAULT_PRIORITY,
    DEFAULT_RETRIES,
    DEFAULT_TASK_TIMEOUT_S,
    MAX_DEADLINE_S,
    MAX_SHOTS,
    MAX_TASKS,
    outputs_dir,
)
from farm.errors import FarmError, ManifestError
from farm.models import ModelConstraints, constraints_for, resolve_model
from farm.storage import OutputTarget, StorageOptions, check_output
from farm.task import Conditioning, ModelRef, RenderSettings, Requirements, Stitching
from farm.timeparse import Deadline
from farm.yamlfile import field_name, line_of

Scalar = str | int | float | bool
RENDER_FIELDS = tuple(f.name for f in dataclasses.fields(RenderSettings))
CONDITIONING_FIELDS = tuple(f.name for f in dataclasses.fields(Conditioning))
CAMPAIGN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
SEED_MAX = 2**63 - 1


class _Overrides(BaseModel):
    """A layer of optional values over a record's defaults: only the keys a manifest sets."""

    model_config = ConfigDict(extra="forbid")

    def set_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    if TYPE_CHECKING:  # the fields are made at run time from a dataclass

        def __getattr__(self, name: str) -> Any: ...


def _optional_fields_of(record: type, name: str, doc: str) -> type[_Overrides]:
    """A pydantic model with every field of the dataclass ``record``, each optional, with the
    bounds its field metadata states: the manifest's keys for that record, declared nowhere else."""
    hints = typing.get_type_hints(record)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        bounds = f.metadata.get("bounds") or {}
        fields[f.name] = ((Annotated[tp, Field(**bounds)] if bounds else tp) | None, None)
    return create_model(name, __base__=_Overrides, __doc__=doc, **fields)


if TYPE_CHECKING:
    RenderOverrides = _Overrides
    RequirementsSpec = _Overrides
    StorageSettings = _Overrides
    ConditioningKeys = _Overrides
    StitchingSettings = _Overrides
else:
    ConditioningKeys = _optional_fields_of(
        Conditioning, "ConditioningKeys", "mode:, image:, last_image:, video:, strength:, fit: of what they sit in."
    )
    StitchingSettings = _optional_fields_of(Stitching, "StitchingSettings", "How a sequence's segments are joined.")
    RenderOverrides = _optional_fields_of(
        RenderSettings, "RenderOverrides", "Render settings; any may be left out to inherit from the layer below."
    )
    RequirementsSpec = _optional_fields_of(
        Requirements, "RequirementsSpec", "What renderers may take a task: GPU memory, GPU type, pool."
    )
    StorageSettings = _optional_fields_of(
        StorageOptions, "StorageSettings", "How to reach an S3-compatible store for output: s3://…"
    )


def conditioning_of(model: BaseModel) -> dict[str, Any]:
    """The conditioning keys (``mode:``, ``image:``, …) a campaign, axis value or task sets."""
    return {k: v for k in CONDITIONING_FIELDS if (v := getattr(model, k)) is not None}


class AxisValue(ConditioningKeys, BaseModel):
    """An axis value that also changes render settings or inputs, e.g. a platform's aspect ratio
    or a product's packshot::

    platform:
      - value: tiktok
        render: {width: 48, height: 80}
    product:
      - value: bottle
        image: packshots/bottle.png
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


class ExtraTask(ConditioningKeys, BaseModel):  # BaseModel named for linters: its fields are pydantic
    """A hand-written task: its own prompt (or the template filled from ``vars``), seed, settings,
    mode and inputs."""

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


class Shot(BaseModel):
    """One shot of a sequence: its prompt (a template, filled per variant), its length, and
    optionally the keyframe image it starts on (``image:``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    frames: Annotated[int, Field(gt=0, le=10000)] | None = None
    image: str | None = None


class SequencePlan(StrEnum):
    CHAINED = "chained"  # each segment continues the last frame of the one before
    KEYFRAMES = "keyframes"  # keyframe stills first, then every segment between two keyframes at once


class SequenceSpec(StitchingSettings):
    """``sequence:``: shots rendered as segments and stitched into one film, per variant and seed."""

    model_config = ConfigDict(extra="forbid")

    plan: SequencePlan = SequencePlan.CHAINED
    shots: Annotated[list[Shot], Field(min_length=1, max_length=MAX_SHOTS)]
    last_image: str | None = None  # keyframes plan: the film's closing keyframe, instead of rendering one


class Manifest(ConditioningKeys, BaseModel):  # BaseModel named for linters: its fields are pydantic
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)  # arbitrary: Deadline

    campaign: str
    model: str = DEFAULT_MODEL
    prompt: str | None = None
    render: RenderOverrides = RenderOverrides()
    axes: dict[str, list[AxisEntry]] = {}
    zip: list[dict[str, list[AxisEntry]]] = []
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] | SeedRange = [0]
    tasks: list[ExtraTask] = []
    sequence: SequenceSpec | None = None
    rows: str | RowsSource | None = None
    output: str | None = None
    storage: StorageSettings = StorageSettings()
    retries: Annotated[int, Field(ge=0, le=100)] = DEFAULT_RETRIES
    priority: Annotated[int, Field(ge=-1000, le=1000)] = DEFAULT_PRIORITY  # higher goes first across jobs
    timeout_s: Annotated[float, Field(gt=0, le=86400)] = DEFAULT_TASK_TIMEOUT_S  # per attempt
    requirements: RequirementsSpec = RequirementsSpec()
    # When the whole job should be done: a duration from submission ("6h", "90m", 3600) or a
    # time with its zone ("2027-03-01T09:00:00+01:00"). The controller scales pools toward it.
    # Parsed here, once, into a Deadline.
    deadline: Deadline | None = None

    @field_validator("deadline", mode="before")
    @classmethod
    def _parse_deadline(cls, value: object) -> Deadline | None:
        if value is None or isinstance(value, Deadline):
            return value
        if isinstance(value, date):  # YAML reads an unquoted 2027-03-01T09:00:00+01:00 as a datetime
            value = value.isoformat()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("give a duration such as 6h, or a time such as 2027-03-01T09:00:00+01:00")
        return Deadline.parse(value, MAX_DEADLINE_S)


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Where:
    """A place in the manifest (or in a rows file) that set a value: for error messages."""

    file: str
    line: int | None
    field: str


@dataclass(frozen=True)
class RowsFile:
    """A rows file's records as read, with where each came from (CSV: its line; Parquet: row n)."""

    path: Path
    records: list[dict[str, Any]]
    first_line: int  # the CSV line of the first record; 0 for Parquet (rows are numbered instead)

    def where(self, i: int) -> Where:
        if self.first_line:
            return Where(str(self.path), self.first_line + i, "row")
        return Where(str(self.path), None, f"row {i + 1}")


@dataclass
class ManifestFile:
    """A validated manifest, its values parsed once into typed ones, and everything needed to point
    back into its text."""

    manifest: Manifest
    path: Path
    text: str
    lines: dict[tuple, int]
    model: ModelRef
    constraints: ModelConstraints  # the sizes the model can take
    target: OutputTarget  # where the clips go, with the options to reach it
    deadline: Deadline | None = None
    rows: RowsFile | None = None

    def where(self, *data_path: Any) -> Where:
        return Where(str(self.path), line_of(self.lines, data_path), field_name(data_path))

    def error(self, message: str, *data_path: Any, hint: str | None = None) -> ManifestError:
        return error_at(self.where(*data_path), message, hint)

    @property
    def max_attempts(self) -> int:
        return self.manifest.retries + 1


def load_manifest(path: str | Path, output_override: str | None = None) -> ManifestFile:
    """Read, parse and validate a manifest file. Raises ManifestError with file:line: field."""
    path = Path(path)
    text = _read_text(path)
    data, lines = yamlfile.parse(text, str(path))
    if not isinstance(data, dict):
        raise ManifestError("a manifest must be a YAML mapping (campaign:, prompt:, axes:, …)", file=str(path), line=1)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc, data, lines, str(path)) from None

    def error(message: str, *data_path: Any, hint: str | None = None) -> ManifestError:
        return error_at(Where(str(path), line_of(lines, data_path), field_name(data_path)), message, hint)

    if not CAMPAIGN_NAME.match(manifest.campaign):
        raise error(
            f"{manifest.campaign!r} is not a valid campaign name",
            "campaign",
            hint="use letters, digits, '-', '_' or '.', starting with a letter or digit (at most 80)",
        )
    base_dir = path.resolve().parent
    try:
        model = resolve_model(manifest.model, base_dir)
    except FarmError as exc:
        raise error(exc.message, "model", hint=exc.hint) from None
    target = _output_target(manifest, output_override, base_dir, error)
    rows = _read_rows(manifest.rows, base_dir, error) if manifest.rows is not None else None
    return ManifestFile(manifest, path, text, lines, model, constraints_for(model), target, manifest.deadline, rows)


def _read_text(path: Path) -> str:
    shown = str(path)
    if not path.exists():
        raise ManifestError(f"manifest {shown} does not exist", hint="check the path")
    if path.is_dir():
        raise ManifestError(f"{shown} is a directory", hint="give the manifest's .yaml file")
    try:
        return yamlfile.read(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {shown}: {exc}") from None


def _output_target(manifest: Manifest, override: str | None, base_dir: Path, error: Any) -> OutputTarget:
    """Where the clips go: --output, else the manifest's output:, else $FARM_HOME/outputs/<campaign>."""
    if override is not None:
        uri, field = _resolve_output(override, Path.cwd()), ("--output",)
    elif manifest.output is not None:
        uri, field = _resolve_output(manifest.output, base_dir), ("output",)
    else:
        uri, field = str(outputs_dir() / manifest.campaign), ("campaign",)
    try:
        check_output(uri)
    except FarmError as exc:
        raise error(exc.message, *field, hint=exc.hint) from None
    return OutputTarget(uri, StorageOptions(**manifest.storage.set_fields()))


def _read_rows(rows: str | RowsSource, base_dir: Path, error: Any) -> RowsFile:
    """The rows file's records (CSV, TSV or Parquet), read once at load time."""
    spec = rows.path if isinstance(rows, RowsSource) else rows
    field_path = ("rows", "path") if isinstance(rows, RowsSource) else ("rows",)
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise error(
            f"rows file {path} does not exist",
            *field_path,
            hint="give a CSV or Parquet file path relative to the manifest",
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            in_footer = pq.ParquetFile(path).metadata.num_rows  # the footer's count: a crafted file is not read
            if in_footer > MAX_TASKS:
                raise error(_too_many_rows(path, in_footer), *field_path, hint="split it, or raise FARM_MAX_TASKS")
            found = RowsFile(path, pq.read_table(path).to_pylist(), 0)
        except ManifestError:
            raise
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise error(f"cannot read rows file {path}: {exc}", *field_path) from None
    elif suffix in (".csv", ".tsv"):
        found = RowsFile(path, _read_csv_rows(path, error, field_path), 2)
    else:
        raise error(
            f"rows file {path.name} is neither .csv nor .parquet", *field_path, hint="convert it to CSV or Parquet"
        )
    if not found.records:
        raise error(f"rows file {path} has no rows", *field_path, hint="add rows or remove rows:")
    return found


def _too_many_rows(path: Path, rows: int | None) -> str:
    """``rows`` None: a CSV file read only as far as the limit."""
    counted = f"{rows:,} rows" if rows is not None else "more rows"
    return (
        f"rows file {path.name} has {counted} than FARM_MAX_TASKS={MAX_TASKS:,}"
        if rows is None
        else (f"rows file {path.name} has {counted}, more than FARM_MAX_TASKS={MAX_TASKS:,}")
    )


def _read_csv_rows(path: Path, error: Any, field_path: tuple) -> list[dict[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            records = list(itertools.islice(reader, MAX_TASKS + 1))  # no further than could ever be allowed
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise error(f"cannot read rows file {path}: {exc}", *field_path) from None
    if len(records) > MAX_TASKS:
        raise error(_too_many_rows(path, None), *field_path, hint="split it, or raise FARM_MAX_TASKS")
    if reader.fieldnames is None:
        raise error(f"rows file {path} has no header row", *field_path, hint="add column names")
    for n, record in enumerate(records):
        if None in record:
            raise ManifestError(
                "this row has more cells than the header has columns",
                file=str(path),
                line=n + 2,
                hint="quote cells that contain the delimiter",
            )
    return records


def _resolve_output(value: str, base_dir: Path) -> str:
    if "://" in value:
        return value.rstrip("/")
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base_dir / path).resolve())


def error_at(where: Where, message: str, hint: str | None = None) -> ManifestError:
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
    # The conditioning keys (inherited, so listed first by pydantic) after the model's own.
    return sorted(names, key=lambda n: n in CONDITIONING_FIELDS)


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
    return ManifestError(message, file=file, line=line_of(lines, path), field=field_name(path) or None, hint=hint)
