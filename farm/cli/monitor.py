"""farm monitor up|down|status: Prometheus and Grafana on loopback (farm.monitor does the work)."""

from __future__ import annotations

from typing import Annotated

import typer

from farm.cli.common import Format, FormatOpt, out, print_json

monitor_app = typer.Typer(help="Prometheus and Grafana for this machine (loopback only).", no_args_is_help=True)


def _print_services(services, fmt: Format) -> None:
    if fmt is Format.json:
        print_json([s.__dict__ for s in services])
        return
    for s in services:
        state = "running" if s.running else "not running"
        where = f" {s.url}" if s.url and s.running else ""
        pid = f" (pid {s.pid})" if s.pid else ""
        note = f" — {s.note}" if s.note else ""
        out.print(f"{s.name}: {state}{where}{pid}{note}", markup=False, highlight=False)


@monitor_app.command("up")
def monitor_up(
    prometheus_port: Annotated[int, typer.Option(help="Prometheus listens on 127.0.0.1:PORT.")] = 9090,
    grafana_port: Annotated[int, typer.Option(help="Grafana (if installed) listens on 127.0.0.1:PORT.")] = 3000,
    fmt: FormatOpt = Format.table,
) -> None:
    """Start Prometheus (and Grafana where installed) scraping farm and Ray, with farm's alerts
    and dashboards. Stays up in the background until 'farm monitor down'."""
    from farm import monitor

    _print_services(monitor.up(prometheus_port, grafana_port), fmt)


@monitor_app.command("down")
def monitor_down(fmt: FormatOpt = Format.table) -> None:
    """Stop what 'farm monitor up' started."""
    from farm import monitor

    _print_services(monitor.down(), fmt)


@monitor_app.command("status")
def monitor_status(fmt: FormatOpt = Format.table) -> None:
    """Whether Prometheus and Grafana started by 'farm monitor up' are running."""
    from farm import monitor

    _print_services(monitor.status(), fmt)
