"""Test-only fault injection: makes chosen attempts misbehave, so tests can prove what farm does
when renderers fail, hang, crash or run slowly.

Off unless ``FARM_TEST_FAULTS`` is set (``config.fault_file()``); production never sets it. Its
value is the faults as JSON (a fault object or a list), or the path of a JSON file of them. Tests
set the variable before Ray starts, so every renderer process inherits it; with a file they
change the faults between jobs (``write_faults``), since a renderer reads it at every attempt.
The renderer's one hook is ``inject``; no production signature carries faults.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from farm.config import fault_file
from farm.task import Task


@dataclass(frozen=True)
class Fault:
    """Attempts of tasks whose prompt contains ``prompt_contains`` misbehave while their attempt
    number is ≤ ``fail_attempts``: ``action`` "raise" fails the attempt, "exit" kills the
    renderer process, "hang" sleeps ``hang_s`` then fails (for timeouts), "slow" sleeps
    ``hang_s`` then renders normally, "oom" raises torch's OutOfMemoryError, as a GPU that ran
    out of memory does. ``once``: a file path; the fault strikes only the first time, across every
    renderer process (an interrupted attempt keeps its number, so ``fail_attempts`` can't say that).
    ``trace``: a file path; every attempt the fault matches appends "prompt<TAB>attempt<TAB>pid"
    to it first, so a test can count what was rendered, and where."""

    prompt_contains: str
    fail_attempts: int = 1_000_000
    action: str = "raise"
    hang_s: float = 3600.0
    once: str = ""
    trace: str = ""

    def apply(self, task: Task, attempt: int) -> None:
        if self.prompt_contains not in task.prompt or attempt > self.fail_attempts:
            return
        if self.trace:
            with open(self.trace, "a") as fh:  # one short write: whole lines across processes
                fh.write(f"{task.prompt}\t{attempt}\t{os.getpid()}\n")
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if self.action == "exit":
            os._exit(17)  # a renderer dying mid-task, as on OOM or node loss
        if self.action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected test fault, attempt {attempt})")
        if self.action in ("hang", "slow"):
            time.sleep(self.hang_s)
        if self.action != "slow":
            raise RuntimeError(f"injected test fault (attempt {attempt})")


def write_faults(path: str | Path, *faults: Fault) -> None:
    """Make these the faults renderers inject (none: clear them). Atomic, so a renderer never
    reads half a file."""
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps([asdict(f) for f in faults]))
    os.replace(temp, path)


def inject(task: Task, attempt: int) -> None:
    """The renderer's hook, called before it generates: apply any fault matching this attempt."""
    value = fault_file()
    if value is None:
        return
    if not value.lstrip().startswith(("{", "[")):
        try:
            value = Path(value).read_text() or "[]"
        except FileNotFoundError:
            return
    found = json.loads(value)
    for fault in found if isinstance(found, list) else [found]:
        Fault(**fault).apply(task, attempt)
