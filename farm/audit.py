"""``farm verify``: what the catalog says a job made, checked against what its output holds; and
the repair, which renders the tasks with problems again.

Policy: a job's outputs are those of its done tasks (their valid succeeded attempts, from any job,
into the job's output). A repair is a new job of just the tasks with problems (the old job's
record under a new id): its first rows invalidate the succeeded attempts that made the bad files,
their commit markers are removed (a marker would have the clip adopted again, bad poster and
all), and it runs like a submit on this machine.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from farm import __version__
from farm.catalog import Catalog, RunSummary
from farm.controller import JobProgress
from farm.jobs import job_target
from farm.local import run_job
from farm.records import JobRecord
from farm.storage import open_sink
from farm.verify import OutputProblem, check_outputs, expected_outputs


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_job`` found of a job's outputs."""

    job: JobRecord
    checked: int  # the job's done tasks, whose outputs were checked
    files: int  # output files checked
    problems: list[OutputProblem]


def verify_job(catalog: Catalog, job_ref: str, sha256: bool = False) -> VerifyReport:
    """Check every output the catalog records for a job's done tasks (clip, poster, commit marker);
    with ``sha256`` read every byte against the recorded checksums."""
    job = catalog.job(job_ref)
    done = catalog.done_rows(job.task_ids, job.output)
    problems = check_outputs(job_target(job), done.values(), full=True, sha256=sha256)
    files = sum(len(expected_outputs(row)) for row in done.values())
    return VerifyReport(job, len(done), files, problems)


def repair_job(
    catalog: Catalog,
    report: VerifyReport,
    job_id: str,
    workers: int | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunSummary | None:
    """Render again, as job ``job_id``, the tasks whose outputs ``report`` found wrong. Returns how
    that job ran (None: nothing to repair)."""
    bad = {p.task_id for p in report.problems}
    if not bad:
        return None
    old = report.job
    tasks = [t for t in catalog.tasks(old.job_id) if t.task_id in bad]
    record = replace(
        old,
        job_id=job_id,
        submitted_at=datetime.now(UTC),
        user=getpass.getuser(),
        host=socket.gethostname(),
        task_ids=tuple(t.task_id for t in tasks),
        farm_version=__version__,
    )
    catalog.invalidate(record.job_id, tasks, old.output, report.problems)
    open_sink(job_target(old)).discard(f"{t.task_id}.json" for t in tasks)
    return run_job(record, tasks, catalog, workers, on_progress, on_notice).summary
