"""Every record farm stores, declared once; Arrow schemas and row mappings are derived here.

A record's fields are the fields of one frozen dataclass (``RenderSettings``, ``Requirements``,
``ModelRef`` and ``Timings`` in ``task.py``; ``JobRecord`` here). Each field may say its Arrow
type in its metadata (``spec("int32")``); plain ``str``/``int``/``float``/``bool`` fields need
nothing. The catalog's tables are lists of ``Column`` built from those dataclasses, so adding a
render setting or an attempt column means editing one declaration plus its use:

- a render setting: a field of ``RenderSettings`` (the manifest, the task list, the attempt rows
  and the task id all follow);
- an attempt column: a ``Column`` in ``ATTEMPT_COLUMNS`` and its value in ``attempt_row``.

Old catalog files keep reading: a reader asks for the current schema by column name, and columns
an older file lacks come back as nulls. ``SCHEMA_VERSION`` counts those additions (see
``catalog.py`` for the history). pyarrow is imported only where a schema is built, so manifest
validation never pays for it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
import types
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from farm.config import DEFAULT_PRIORITY, DEFAULT_TASK_TIMEOUT_S
from farm.task import (
    Conditioning,
    FailureKind,
    InputRef,
    InputRole,
    ModelKind,
    ModelRef,
    RenderSettings,
    Requirements,
    Result,
    Stitching,
    StorageKind,
    Task,
    Timings,
    spec,
)

# v2: attempt_uid, storage, job priority/timeout/storage; v3: job deadline_at; v4: attempt error_kind;
# v5: render settings precision/cache/compile, attempt run_variant and weights_identity; attempt
# poster_bytes, poster_sha256 and invalidates; v6: conditioning (image, last_image, video, strength,
# fit), stitching, parents, inputs (attempts: as read), seam_score, seam_scores
SCHEMA_VERSION = 6

_PY_TO_ARROW = {str: "string", int: "int64", float: "float64", bool: "bool", datetime: "timestamp"}


@dataclass(frozen=True)
class Column:
    """One column of a stored table: its name and Arrow type (by name, so nothing imports pyarrow
    until a schema is needed)."""

    name: str
    # string | bool | int16 | int32 | int64 | float64 | timestamp | map<string,string> | list<string> |
    # list<double> | list<input> (InputRef: role, uri, sha256)
    type: str


def columns_of(record: type, prefix: str = "", skip: Iterable[str] = ()) -> list[Column]:
    """The columns of a dataclass's fields, in declaration order, named ``prefix + field``."""
    hints = typing.get_type_hints(record)
    skipped = set(skip)
    out = []
    for f in dataclasses.fields(record):
        if f.name in skipped:
            continue
        arrow_type = f.metadata.get("arrow") or _PY_TO_ARROW.get(_bare(hints[f.name]))
        if arrow_type is None:
            raise TypeError(f"{record.__name__}.{f.name}: say its Arrow type with field(metadata=spec(...))")
        out.append(Column(prefix + f.name, arrow_type))
    return out


def _bare(hint: Any) -> Any:
    """``X | None`` → X; a str enum → str."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if isinstance(hint, type) and issubclass(hint, str):
        return str
    return hint


def arrow_schema(columns: Sequence[Column]) -> Any:
    """The ``pyarrow.Schema`` of a list of columns."""
    import pyarrow as pa

    types_ = {
        "string": pa.string(),
        "bool": pa.bool_(),
        "int16": pa.int16(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "timestamp": pa.timestamp("ms", tz="UTC"),
        "map<string,string>": pa.map_(pa.string(), pa.string()),
        "list<string>": pa.list_(pa.string()),
        "list<double>": pa.list_(pa.float64()),
        "list<input>": pa.list_(pa.struct([("role", pa.string()), ("uri", pa.string()), ("sha256", pa.string())])),
    }
    return pa.schema([(c.name, types_[c.type]) for c in columns])


def values_of(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass's field values as columns (``prefix + field``), enums as their values."""
    record: type = type(obj)
    return {column: _plain(getattr(obj, name)) for name, column in _named_fields(record, prefix)}


@functools.cache
def _named_fields(record: type, prefix: str) -> tuple[tuple[str, str], ...]:
    """(field, column) of a dataclass: a catalog row is built for every attempt, and looking the
    fields up each time was most of the controller's cost per attempt."""
    return tuple((f.name, prefix + f.name) for f in dataclasses.fields(record))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, str) and hasattr(value, "value") else value


def build(record: type, row: Mapping[str, Any], prefix: str = "") -> Any:
    """A dataclass from a row's columns (``prefix + field``); null columns keep the field's default,
    str enum fields come back as their enum."""
    kwargs = {}
    enums = _enum_fields(record)
    for f in dataclasses.fields(record):
        value = row.get(prefix + f.name)
        if value is not None:
            kwargs[f.name] = enums[f.name](value) if f.name in enums else value
    return record(**kwargs)


@functools.cache
def _enum_fields(record: type) -> dict[str, type]:
    hints = typing.get_type_hints(record)
    out = {}
    for f in dataclasses.fields(record):
        bare = hints[f.name]
        if typing.get_origin(bare) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(bare) if a is not type(None)]
            bare = args[0] if len(args) == 1 else bare
        if isinstance(bare, type) and issubclass(bare, enum.Enum):
            out[f.name] = bare
    return out


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobRecord:
    """One submission of one manifest: written by the client, read by the controller (also after a
    restart) and by every status command."""

    job_id: str
    campaign: str
    submitted_at: datetime
    user: str
    host: str
    manifest_path: str
    manifest_sha256: str
    manifest_yaml: str
    model: str
    output: str
    max_attempts: int = field(metadata=spec("int32"))
    task_ids: tuple[str, ...] = field(metadata=spec("list<string>"))
    farm_version: str
    priority: int = field(default=DEFAULT_PRIORITY, metadata=spec("int32"))
    timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    storage_json: str = "{}"  # StorageOptions of the output, never credentials
    deadline_at: datetime | None = None  # when the job should be done (manifest deadline:)

    @property
    def task_count(self) -> int:
        return len(self.task_ids)


JOB_COLUMNS = [
    *columns_of(JobRecord),
    Column("task_count", "int64"),
    Column("schema_version", "int16"),
]


def job_row(job: JobRecord) -> dict[str, Any]:
    return {
        **values_of(job),
        "task_ids": list(job.task_ids),
        "task_count": job.task_count,
        "schema_version": SCHEMA_VERSION,
    }


def job_from_row(row: Mapping[str, Any]) -> JobRecord:
    job: JobRecord = build(JobRecord, {**row, "task_ids": tuple(row.get("task_ids") or ())})
    return job


# ----------------------------------------------------------------------------- task lists

TASK_COLUMNS = [
    Column("task_id", "string"),
    Column("prompt", "string"),
    Column("seed", "int64"),
    *columns_of(Conditioning),  # its "mode" column is older than the rest (v1)
    Column("source", "string"),
    Column("variant", "map<string,string>"),
    *columns_of(ModelRef, prefix="model_"),
    *columns_of(RenderSettings),
    *columns_of(Requirements),
    Column("inputs", "list<input>"),  # v6
    Column("parents", "list<string>"),  # v6
    *columns_of(Stitching, prefix="stitch_"),  # v6: null unless a stitch task
]


def inputs_value(inputs: Sequence[InputRef]) -> list[dict[str, str]]:
    return [{"role": i.role.value, "uri": i.uri, "sha256": i.sha256} for i in inputs]


def inputs_from(value: Sequence[Mapping[str, Any]] | None) -> tuple[InputRef, ...]:
    return tuple(InputRef(InputRole(i["role"]), i["uri"], i["sha256"] or "") for i in value or ())


def _stitching_values(task: Task) -> dict[str, Any]:
    if task.stitching is None:
        return dict.fromkeys(column for _, column in _named_fields(Stitching, "stitch_"))
    return values_of(task.stitching, prefix="stitch_")


def task_row(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "prompt": task.prompt,
        "seed": task.seed,
        **values_of(task.conditioning),
        "source": task.source,
        "variant": list(task.variant),
        **values_of(task.model, prefix="model_"),
        **values_of(task.settings),
        **values_of(task.needs),
        "inputs": inputs_value(task.inputs),
        "parents": list(task.parents),
        **_stitching_values(task),
    }


def tasks_from_columns(columns: Mapping[str, list[Any]], count: int) -> list[Task]:
    """Tasks from a task list's columns (as ``pyarrow.Table.to_pydict`` gives them)."""
    models: dict[tuple[Any, ...], ModelRef] = {}
    out = []
    for i in range(count):
        row = {name: values[i] for name, values in columns.items()}
        model = build(ModelRef, row, prefix="model_")
        model = models.setdefault(dataclasses.astuple(model), model)
        out.append(
            Task(
                task_id=row["task_id"],
                prompt=row["prompt"],
                seed=row["seed"],
                model=dataclasses.replace(model, kind=ModelKind(model.kind)),
                settings=build(RenderSettings, row),
                variant=tuple(row["variant"] or ()),
                conditioning=build(Conditioning, row),
                source=row["source"] or "",
                needs=build(Requirements, row),
                inputs=inputs_from(row.get("inputs")),
                parents=tuple(row.get("parents") or ()),
                stitching=build(Stitching, row, prefix="stitch_") if row.get("stitch_crossfade") is not None else None,
            )
        )
    return out


# ----------------------------------------------------------------------------- attempts

ATTEMPT_COLUMNS = [
    Column("task_id", "string"),
    Column("attempt", "int32"),
    Column("status", "string"),  # AttemptStatus
    Column("final", "bool"),  # no further attempt of this task follows in this job
    Column("prompt", "string"),
    Column("variant", "map<string,string>"),
    Column("seed", "int64"),
    Column("model", "string"),  # as the manifest names it
    Column("model_identity", "string"),
    *columns_of(Conditioning),  # "mode" since v1, the others v6
    *columns_of(RenderSettings),
    Column("output_root", "string"),
    Column("output_uri", "string"),
    Column("poster_uri", "string"),
    Column("bytes", "int64"),
    Column("sha256", "string"),
    *columns_of(Timings),
    Column("node_id", "string"),
    Column("actor_id", "string"),
    Column("error", "string"),
    Column("recovered", "bool"),  # adopted from the sink's commit marker after a driver crash
    Column("started_at", "timestamp"),
    Column("finished_at", "timestamp"),
    Column("schema_version", "int16"),
    Column("attempt_uid", "string"),  # v2: unique per attempt row, for tools that join or dedupe
    Column("storage", "string"),  # v2: StorageKind of the output
    Column("error_kind", "string"),  # v4: FailureKind of a failed attempt; null otherwise
    Column("run_variant", "string"),  # v5: the variant as run: precision, quantisation, compute dtype, device
    Column("weights_identity", "string"),  # v5: the weights it ran with (the model's, or its GGUF file's)
    Column("poster_bytes", "int64"),  # v5: the poster's size and checksum, for farm verify
    Column("poster_sha256", "string"),
    # v5: on an ``invalidated`` row, the succeeded attempt whose output was found missing or changed
    # (its attempt_uid, or task_id@finished_at for rows older than v2)
    Column("invalidates", "string"),
    # v6: the inputs as read (URI and the sha256 of the bytes read: a parent's clip too), the tasks
    # it depended on, how a stitch joined, a chained segment's seam against the segment before it,
    # a stitched film's seams (one per cut)
    Column("inputs", "list<input>"),
    Column("parents", "list<string>"),
    *columns_of(Stitching, prefix="stitch_"),
    Column("seam_score", "float64"),
    Column("seam_scores", "list<double>"),
]
ATTEMPT_FULL_COLUMNS = [*ATTEMPT_COLUMNS, Column("job_id", "string")]  # + the hive partition


def attempt_row(
    task: Task, result: Result, output_root: str, final: bool, recovered: bool = False, invalidates: str | None = None
) -> dict[str, Any]:
    """The catalog row of one attempt of ``task`` (``invalidates``: see the column)."""
    return {
        "task_id": task.task_id,
        "attempt": result.attempt,
        "status": result.status.value,
        "final": final,
        "prompt": task.prompt,
        "variant": list(task.variant),
        "seed": task.seed,
        "model": task.model.spec,
        "model_identity": task.model.identity,
        **values_of(task.conditioning),
        **values_of(task.settings),
        "output_root": output_root,
        "output_uri": result.output_uri,
        "poster_uri": result.poster_uri,
        "bytes": result.bytes,
        "sha256": result.sha256,
        **values_of(result.timings),
        "node_id": result.node_id,
        "actor_id": result.actor_id,
        "error": result.error,
        "recovered": recovered,
        "started_at": _utc(result.started_at or time.time()),
        "finished_at": _utc(result.finished_at or time.time()),
        "schema_version": SCHEMA_VERSION,
        "attempt_uid": uuid.uuid4().hex,
        "storage": StorageKind.of(output_root).value,
        "error_kind": None if result.succeeded else FailureKind(result.error_kind or FailureKind.OTHER).value,
        "run_variant": result.run_variant,
        "weights_identity": result.weights_identity,
        "poster_bytes": result.poster_bytes,
        "poster_sha256": result.poster_sha256,
        "invalidates": invalidates,
        "inputs": inputs_value(result.inputs or task.inputs),
        "parents": list(task.parents),
        **_stitching_values(task),
        "seam_score": result.seam_score,
        "seam_scores": list(result.seam_scores) if result.seam_scores else None,
    }


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


# ----------------------------------------------------------------------------- job events

EVENT_COLUMNS = [Column("event", "string"), Column("at", "timestamp"), Column("detail", "string")]
