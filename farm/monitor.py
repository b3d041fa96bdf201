"""`farm monitor up|down|status`: Prometheus (and Grafana where installed) for a user on one
machine, on loopback, with the scrape config, alert rules, provisioning and dashboards that ship
in the repository's deploy/ and dashboards/ folders.

The services run in the background (their own sessions, so they outlive the command) with their
data, logs and pid files under $FARM_HOME/monitor; `farm monitor down` stops them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from farm import config
from farm.config import farm_home, metrics_address
from farm.errors import FarmError

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_SERVICE_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_GRAFANA_PORT = 3000
_READY_TIMEOUT_S = 30.0


class MonitorError(FarmError):
    pass


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    pid: int | None
    running: bool
    log: str
    note: str = ""


def deploy_dir() -> Path:
    """The deploy/ folder: FARM_DEPLOY_DIR, else the checkout farm runs from."""
    path = config.deploy_dir(REPO_ROOT / "deploy")
    if not (path / "prometheus" / "prometheus.yml").is_file():
        raise MonitorError(
            f"no deploy/prometheus/prometheus.yml under {path}",
            hint="run farm from its repository checkout, or set FARM_DEPLOY_DIR to its deploy/ folder",
        )
    return path


def dashboards_dir() -> Path:
    return config.dashboards_dir(deploy_dir().parent / "dashboards")


def monitor_dir() -> Path:
    return farm_home() / "monitor"


def prometheus_config(
    farm_target: str,
    service_discovery_file: str = RAY_SERVICE_DISCOVERY_FILE,
    scrape_interval: str | None = None,
) -> dict:
    """The shipped scrape config, made runnable from anywhere: absolute rule files, the farm
    exporter's address, Ray's service-discovery file."""
    import yaml

    shipped = deploy_dir() / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(shipped.read_text())
    config["rule_files"] = [str((shipped.parent / f).resolve()) for f in config.get("rule_files", [])]
    if scrape_interval:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    for job in config["scrape_configs"]:
        if job["job_name"] == "farm":
            job["static_configs"] = [{"targets": [farm_target]}]
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [service_discovery_file]
    return config


def _scrape_target(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, name: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise MonitorError(
                f"{name} exited at start: {tail[0] if tail else 'no output'}",
                hint=f"see {log}; is the port taken? choose another with --{name}-port",
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise MonitorError(f"{name} did not answer on {url} within {_READY_TIMEOUT_S:g}s", hint=f"see {log}")


def _start(name: str, argv: list[str], ready_url: str, env: dict | None = None) -> Service:
    base = monitor_dir()
    base.mkdir(parents=True, exist_ok=True)
    pid_file, log = base / f"{name}.pid", base / f"{name}.log"
    pid = _pid_alive(pid_file)
    if pid:
        return Service(name, ready_url.rsplit("/", 2)[0], pid, True, str(log), "already running")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=base,
        )
    pid_file.write_text(str(proc.pid))
    try:
        _wait_ready(ready_url, proc, log, name)
    except MonitorError:
        _stop_pid(proc.pid)
        pid_file.unlink(missing_ok=True)
        raise
    return Service(name, ready_url.rsplit("/", 2)[0], proc.pid, True, str(log))


def up(
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
    grafana_port: int = DEFAULT_GRAFANA_PORT,
    farm_metrics: str | None = None,
    service_discovery_file: str = RAY_SERVICE_DISCOVERY_FILE,
    scrape_interval: str | None = None,
) -> list[Service]:
    """Start Prometheus (and Grafana if installed) on 127.0.0.1. Idempotent."""
    import yaml

    prometheus = shutil.which("prometheus")
    if not prometheus:
        raise MonitorError(
            "prometheus is not installed",
            hint="install it (Debian/Ubuntu: apt-get install "
            "prometheus) or download it from prometheus.io, then run farm monitor up again",
        )
    base = monitor_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = _scrape_target(farm_metrics or metrics_address() or "127.0.0.1:9400")
    config_path = base / "prometheus.yml"
    config_path.write_text(
        yaml.safe_dump(prometheus_config(target, service_discovery_file, scrape_interval), sort_keys=False)
    )
    services = [
        _start(
            "prometheus",
            [
                prometheus,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={base / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--storage.tsdb.retention.time=15d",
            ],
            f"http://127.0.0.1:{prometheus_port}/-/ready",
        )
    ]
    services.append(_start_grafana(grafana_port, f"http://127.0.0.1:{prometheus_port}"))
    return services


def _start_grafana(port: int, prometheus_url: str) -> Service:
    binary = shutil.which("grafana") or shutil.which("grafana-server")
    url = f"http://127.0.0.1:{port}"
    if not binary:
        return Service(
            "grafana",
            url,
            None,
            False,
            "",
            "not installed: install Grafana (grafana.com/grafana/"
            "download) and run farm monitor up again, or import dashboards/*.json into yours",
        )
    home = next(
        (
            p
            for p in ("/usr/share/grafana", "/usr/local/share/grafana", Path(binary).resolve().parents[1])
            if (Path(p) / "conf" / "defaults.ini").is_file()
        ),
        None,
    )
    if home is None:
        return Service("grafana", url, None, False, "", f"found {binary} but not its home (conf/defaults.ini)")
    base = monitor_dir()
    ini = base / "grafana.ini"
    ini.write_text(
        "[server]\nhttp_addr = 127.0.0.1\nhttp_port = {port}\n"
        "[paths]\ndata = {data}\nlogs = {logs}\nprovisioning = {prov}\n"
        "[analytics]\nreporting_enabled = false\ncheck_for_updates = false\n".format(
            port=port,
            data=base / "grafana-data",
            logs=base / "grafana-logs",
            prov=deploy_dir() / "grafana" / "provisioning",
        )
    )
    argv = [binary, "server"] if Path(binary).name == "grafana" else [binary]
    argv += [f"--homepath={home}", f"--config={ini}"]
    return _start(
        "grafana",
        argv,
        f"{url}/api/health",
        env={"FARM_PROMETHEUS_URL": prometheus_url, "FARM_DASHBOARDS_DIR": str(dashboards_dir())},
    )


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def down() -> list[Service]:
    """Stop what `up` started."""
    stopped = []
    for name in ("grafana", "prometheus"):
        pid_file = monitor_dir() / f"{name}.pid"
        pid = _pid_alive(pid_file)
        if pid:
            _stop_pid(pid)
            stopped.append(Service(name, "", pid, False, str(monitor_dir() / f"{name}.log"), "stopped"))
        pid_file.unlink(missing_ok=True)
    return stopped


def status() -> list[Service]:
    out = []
    for name in ("prometheus", "grafana"):
        pid = _pid_alive(monitor_dir() / f"{name}.pid")
        out.append(Service(name, "", pid, pid is not None, str(monitor_dir() / f"{name}.log")))
    return out
