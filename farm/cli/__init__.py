"""The `farm` command: parse arguments, call farm.api, show the answer. No logic of its own.

Exit codes: 0 everything succeeded, 1 some tasks failed (or, for verify and catalog check,
problems remain), 2 bad input (one line on stderr), 70 an unexpected error (one line on stderr,
the traceback in a log under $FARM_HOME/logs), 130 interrupted.

One module per command group, each registering its commands on the shared app (common.app):
planning (validate, plan), submit (submit, cancel), cluster (pools; the cluster sub-app),
jobs (jobs, status), results, catalog and monitor (sub-apps). They import farm.api and anything
heavier inside the command, so that `farm --help` stays quick.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

# isort: off
# The command modules register their commands as they are imported: this order is the order of `farm --help`.
from farm.cli import planning, submit, cluster, jobs, results, verify  # noqa: F401

# isort: on
from farm import interrupts
from farm.cli.catalog import catalog_app
from farm.cli.cluster import cluster_app
from farm.cli.common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, app, err, stdout
from farm.cli.monitor import monitor_app
from farm.config import check_environment
from farm.errors import FarmError

__all__ = ["app", "main"]

# Sub-apps come after the commands in `farm --help`, in this order.
app.add_typer(catalog_app, name="catalog")
app.add_typer(monitor_app, name="monitor")
app.add_typer(cluster_app, name="cluster")

# typer ≥ 0.2x vendors click and raises its own exception types; older releases raise click's.
if hasattr(typer, "TyperException"):
    _USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
else:  # pragma: no cover - older typer
    import click

    _USAGE_ERRORS = (click.ClickException,)


def main() -> None:
    original = sys.stdout
    stdout.real, sys.stdout = original, sys.stderr
    connected_before = _ray_connected()
    try:
        _run()
    finally:  # called in-process (tests, embedding): leave stdout as it was found
        # Ray's listener thread prints cluster events (a node marked dead…) to sys.stdout until the
        # driver disconnects, which would otherwise happen at interpreter exit, after stdout is
        # restored: such a line once landed after 'farm status -f json's JSON. Disconnect while it
        # still goes to stderr (only a connection this command made).
        if not connected_before and _ray_connected():
            sys.modules["ray"].shutdown()
        stdout.real, sys.stdout = None, original


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported by a command that did not use Ray
    return ray is not None and ray.is_initialized()


def _run() -> None:
    _warnings_as_lines()
    interrupts.install()
    try:
        check_environment()  # a bad FARM_* value is one line here, not a surprise mid-job
        # Without standalone mode click hands back typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else EXIT_OK)
    except FarmError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort
        err.print("interrupted: finished clips are catalogued; submit the manifest again to resume", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except _USAGE_ERRORS as exc:  # bad arguments: one line, not click's usage box
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx else "farm"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"error: {message} — see '{command} --help'", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as exc:  # a bug, not a user's mistake: one line here, the traceback in a log
        log = _crash_log(exc)
        what = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        err.print(
            f"error: internal error in 'farm {' '.join(sys.argv[1:2])}': {what} — the full traceback is in {log}; "
            "please report it with that file",
            markup=False,
            highlight=False,
        )
        sys.exit(EXIT_INTERNAL)


def _warnings_as_lines() -> None:
    """farm's warnings (a damaged catalog file skipped…) as one 'warning:' line each on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("farm")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _crash_log(exc: BaseException) -> Path:
    """Write the traceback to $FARM_HOME/logs (the temp folder if that cannot be written)."""
    import tempfile
    import traceback
    from datetime import datetime

    from farm import __version__
    from farm.config import logs_dir

    text = f"farm {__version__}, python {sys.version.split()[0]}\ncommand: {sys.argv}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    name = f"farm-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    for folder in (logs_dir(), Path(tempfile.gettempdir()) / "farm-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(no log: neither $FARM_HOME/logs nor the temp folder could be written)")
