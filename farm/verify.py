"""Is a done task's output still the file farm made? Checked on resume and by ``farm verify``.

Policy:
- A task is done by its **valid** succeeded attempts into an output: those no ``invalidated`` row
  names (``valid_successes``). The newest of them is what the output must hold.
- **On resume** (every submit, and every job a controller admits) only the clip is checked, by
  size: a stat per clip locally, HEADs or a listing of the prefix on S3. That keeps re-submitting a
  finished job of 10,000 clips fast (``bench/verify.py``). A clip that is missing or has another
  size than recorded makes the task not done: the admitting job writes an ``invalidated`` row
  (``error_kind`` ``output_missing`` or ``output_changed``) and renders it again.
- **``farm verify``** checks every output the attempt recorded: clip and poster (existence and
  size, and with ``--sha256`` every byte against the recorded checksum) and the commit marker (it
  exists and names the same clip). Posters of rows older than schema v5 have no recorded size:
  they are checked for existence only.

The judging is pure (``expected_outputs``, ``judge``, ``judge_marker``); ``check_outputs`` does the
I/O through the output's sink, so it works the same on a local folder and on S3.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from farm.records import attempt_row
from farm.storage import OutputTarget, StorageError, StorageOptions, open_sink
from farm.task import AttemptStatus, FailureKind, Result, StorageKind, Task

if TYPE_CHECKING:
    from farm.records import JobRecord


class Problem(StrEnum):
    """What is wrong with one output file."""

    MISSING = "missing"
    WRONG_SIZE = "wrong size"
    WRONG_CHECKSUM = "wrong checksum"
    BAD_MARKER = "bad marker"  # the commit marker cannot be read, or names another clip


class OutputKind(StrEnum):
    """Which of a task's outputs (later deliverables join here)."""

    CLIP = "clip"
    POSTER = "poster"
    MARKER = "marker"


@dataclass(frozen=True)
class Expected:
    """One output file as the catalog recorded it (``bytes``/``sha256`` None: not recorded)."""

    task_id: str
    kind: OutputKind
    name: str  # the file's name in the output (the sink's key under its root)
    uri: str
    bytes: int | None
    sha256: str | None


@dataclass(frozen=True)
class OutputProblem:
    task_id: str
    path: str
    problem: Problem
    detail: str
    attempt_key: str = ""  # the succeeded attempt whose output this is (see ``success_key``)

    @property
    def failure_kind(self) -> FailureKind:
        """The ``error_kind`` of the row that invalidates the attempt."""
        return FailureKind.OUTPUT_MISSING if self.problem is Problem.MISSING else FailureKind.OUTPUT_CHANGED

    def line(self) -> str:
        return f"{self.path}: {self.problem.value} ({self.detail})"


def success_key(row: Mapping[str, Any]) -> str:
    """What identifies a succeeded attempt for an ``invalidates`` column: its attempt_uid, or (rows
    older than v2 have none) its task and finish time."""
    uid = row.get("attempt_uid")
    if uid:
        return str(uid)
    finished = row.get("finished_at")
    return f"{row['task_id']}@{finished.isoformat() if isinstance(finished, datetime) else finished}"


def valid_successes(rows: Iterable[Mapping[str, Any]], output_root: str) -> dict[str, Mapping[str, Any]]:
    """task_id → its newest succeeded attempt into ``output_root`` that no invalidated row names.
    ``rows`` need task_id, status, output_root, attempt_uid, finished_at and invalidates."""
    invalidated: set[str] = set()
    successes: list[Mapping[str, Any]] = []
    for row in rows:
        if row["output_root"] != output_root:
            continue
        if row["status"] == AttemptStatus.SUCCEEDED:
            successes.append(row)
        elif row["status"] == AttemptStatus.INVALIDATED and row.get("invalidates"):
            invalidated.add(row["invalidates"])
    best: dict[str, Mapping[str, Any]] = {}
    for row in successes:
        if success_key(row) in invalidated:
            continue
        current = best.get(row["task_id"])
        if current is None or _later(row, current):
            best[row["task_id"]] = row
    return best


def _later(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    fa, fb = a.get("finished_at"), b.get("finished_at")
    return fb is None or (fa is not None and fa > fb)


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def expected_outputs(row: Mapping[str, Any], full: bool = True) -> list[Expected]:
    """The output files a succeeded attempt row recorded: the clip, and with ``full`` its poster and
    commit marker too."""
    task_id = row["task_id"]
    out = [Expected(task_id, OutputKind.CLIP, _name(row["output_uri"]), row["output_uri"], row.get("bytes"), None)]
    if not full:
        return out
    out[0] = Expected(task_id, OutputKind.CLIP, out[0].name, out[0].uri, row.get("bytes"), row.get("sha256") or None)
    if row.get("poster_uri"):
        poster_bytes = row.get("poster_bytes") or None  # 0 / null: a row older than v5
        out.append(
            Expected(
                task_id,
                OutputKind.POSTER,
                _name(row["poster_uri"]),
                row["poster_uri"],
                poster_bytes,
                row.get("poster_sha256") or None,
            )
        )
    marker = f"{task_id}.json"
    marker_uri = row["output_uri"][: -len(out[0].name)] + marker
    out.append(Expected(task_id, OutputKind.MARKER, marker, marker_uri, None, row.get("sha256") or None))
    return out


def judge(expected: Expected, size: int | None, sha256: str | None = None, key: str = "") -> OutputProblem | None:
    """The problem of a file found with ``size`` (None: missing) and, when read, ``sha256``."""
    if size is None:
        recorded = f"the catalog recorded {expected.bytes} bytes" if expected.bytes else "the catalog recorded it"
        return OutputProblem(expected.task_id, expected.uri, Problem.MISSING, recorded, key)
    if expected.bytes is not None and size != expected.bytes:
        detail = f"{size} bytes, the catalog recorded {expected.bytes}"
        return OutputProblem(expected.task_id, expected.uri, Problem.WRONG_SIZE, detail, key)
    if sha256 is not None and expected.sha256 and sha256 != expected.sha256:
        detail = f"sha256 {sha256[:12]}…, the catalog recorded {expected.sha256[:12]}…"
        return OutputProblem(expected.task_id, expected.uri, Problem.WRONG_CHECKSUM, detail, key)
    return None


def judge_marker(expected: Expected, record: dict | None, key: str = "") -> OutputProblem | None:
    """A commit marker must exist, be readable and name this task's clip (same checksum)."""
    if record is None:
        return OutputProblem(expected.task_id, expected.uri, Problem.MISSING, "the clip's commit marker", key)
    if record.get("task_id") != expected.task_id or (expected.sha256 and record.get("sha256") != expected.sha256):
        detail = f"names task {record.get('task_id')!r}, clip sha256 {str(record.get('sha256'))[:12]}…"
        return OutputProblem(expected.task_id, expected.uri, Problem.BAD_MARKER, detail, key)
    return None


def check_outputs(
    target: OutputTarget, rows: Iterable[Mapping[str, Any]], *, full: bool = False, sha256: bool = False
) -> list[OutputProblem]:
    """The problems of the outputs these succeeded attempt rows recorded, in ``target``: only the
    clips' sizes unless ``full``; with ``sha256`` every file's bytes too (clip and poster)."""
    rows = list(rows)
    if not rows:
        return []
    sink = open_sink(target)
    expected = [(e, success_key(r)) for r in rows for e in expected_outputs(r, full)]
    try:
        files = [(e, k) for e, k in expected if e.kind is not OutputKind.MARKER]
        sizes = sink.sizes([e.name for e, _ in files])
        problems: list[OutputProblem] = []
        for e, key in files:
            size = sizes.get(e.name)
            digest = sink.sha256_of(e.name) if sha256 and size is not None and e.sha256 else None
            found = judge(e, size, digest, key)
            if found:
                problems.append(found)
        for e, key in expected:
            if e.kind is OutputKind.MARKER:
                found = judge_marker(e, sink.get_json(e.name), key)
                if found:
                    problems.append(found)
        return problems
    except StorageError:
        raise
    except Exception as exc:  # an unreachable store or unreadable folder: one line, not a traceback
        raise StorageError(
            f"cannot check the outputs in {target.uri}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            hint="check that the output is reachable (S3 endpoint, credentials) and readable",
        ) from None


# Columns the done-check reads: enough to pick each task's valid success and check its clip.
_DONE_COLUMNS = ["task_id", "status", "output_root", "output_uri", "bytes", "attempt_uid", "finished_at", "invalidates"]
_VERIFY_COLUMNS = [*_DONE_COLUMNS, "sha256", "poster_uri", "poster_bytes", "poster_sha256"]


@dataclass(frozen=True)
class DoneCheck:
    """Which tasks are done into an output, verified: ``done`` (task_id → clip uri) and, for tasks
    whose recorded clip is missing or changed, the problem (they are not in ``done``)."""

    done: dict[str, str]
    problems: dict[str, OutputProblem]


class VerifiedDone:
    """The done rule, as ``Catalog`` methods (mixed into it): which tasks are done into an output,
    verified against what the output holds, and the ``invalidated`` rows that undo a success."""

    if TYPE_CHECKING:  # provided by Catalog

        def attempts(self, job_id: str | None = None, columns: list[str] | None = None) -> Any: ...

        def jobs(self) -> list[JobRecord]: ...

        def _write_attempts(self, job_id: str, rows: list[dict]) -> None: ...

    def done(self, task_ids: Iterable[str], output: str | OutputTarget) -> dict[str, str]:
        """task_id → clip uri for the tasks done into this output: a valid succeeded attempt, and
        its clip still there with the size recorded (see ``check_done``)."""
        return self.check_done(task_ids, output).done

    def check_done(self, task_ids: Iterable[str], output: str | OutputTarget) -> DoneCheck:
        """The tasks done into this output, their clips verified (``farm/verify.py``); the problem of
        each whose recorded clip is missing or changed."""
        target = output if isinstance(output, OutputTarget) else self._target(output)
        best = self.done_rows(task_ids, target.uri, _DONE_COLUMNS)
        problems = {p.task_id: p for p in check_outputs(target, best.values())}
        done = {task_id: row["output_uri"] for task_id, row in best.items() if task_id not in problems}
        return DoneCheck(done, problems)

    def done_rows(self, task_ids: Iterable[str], output_root: str, columns: list[str] | None = None) -> dict[str, dict]:
        """task_id → the row of its valid succeeded attempt into ``output_root`` (not verified), with
        ``columns`` (default: every output column ``farm verify`` checks)."""
        columns = columns or _VERIFY_COLUMNS
        wanted = set(task_ids)
        table = self.attempts(columns=columns)
        values = [table.column(c).to_pylist() for c in columns]
        rows = (dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True))
        best = valid_successes((r for r in rows if r["task_id"] in wanted), output_root)
        return {task_id: dict(row) for task_id, row in best.items()}

    def resume_done(self, job_id: str, tasks: list[Task], target: OutputTarget) -> dict[str, str]:
        """``done`` for a job being admitted: each done task whose clip is missing or changed gets an
        ``invalidated`` row in this job (``error_kind`` says why) and is rendered again."""
        check = self.check_done([t.task_id for t in tasks], target)
        self.invalidate(job_id, tasks, target.uri, check.problems.values())
        return check.done

    def invalidate(self, job_id: str, tasks: list[Task], output_root: str, problems: Iterable[OutputProblem]) -> int:
        """Write an ``invalidated`` row for each problem's succeeded attempt: its task is no longer
        done into ``output_root``. Returns the rows written."""
        by_id = {t.task_id: t for t in tasks}
        rows = []
        now = time.time()
        for p in {p.task_id: p for p in problems}.values():  # one row per attempt, the first problem says why
            result = Result(
                p.task_id,
                0,
                AttemptStatus.INVALIDATED,
                output_uri=p.path,
                error=p.line(),
                started_at=now,
                finished_at=now,
                error_kind=p.failure_kind,
            )
            rows.append(attempt_row(by_id[p.task_id], result, output_root, final=False, invalidates=p.attempt_key))
        if rows:
            self._write_attempts(job_id, rows)
        return len(rows)

    def _target(self, output_root: str) -> OutputTarget:
        """An output by its uri. On S3 the options (endpoint, region…) are those the newest job into
        it recorded, so a manifest's ``storage:`` reaches the same store the clips went to."""
        if StorageKind.of(output_root) is not StorageKind.S3:
            return OutputTarget(output_root)
        jobs = [j for j in self.jobs() if j.output == output_root]
        return OutputTarget(output_root, StorageOptions.from_json(jobs[-1].storage_json if jobs else None))
