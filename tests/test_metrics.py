"""Observability against a real Prometheus: farm's exporter and Ray's metrics agents scraped during
real jobs on a two-pool Ray cluster; every dashboard query and alert rule evaluated by Prometheus
itself; promtool on the exposition, the scrape config and the alert rules."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from farm import api, metrics, monitor
from farm.catalog import Catalog
from farm.faults import Fault, write_faults
from tests.conftest import FAULTS_FILE

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SMALL = {"farm_pool:small": 2, "farm_gpu:L4": 1, "farm_vram_gb": 24, "farm_cost_cents_per_hour": 80}
BIG = {"farm_pool:big": 1, "farm_gpu:H100": 1, "farm_vram_gb": 80, "farm_cost_cents_per_hour": 400}
# Ray exports these only from nodes with GPUs; this machine has none. Their names are checked
# against Ray's own source instead, so a typo still fails.
GPU_ONLY = {"ray_node_gram_used", "ray_node_gram_available"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__name"}

JOB = """
campaign: {name}
prompt: "{name} clip {{n}}"
render: {{width: 32, height: 32, frames: 5, fps: 8, steps: 2}}
axes:
  n: [{ns}]
retries: {retries}
timeout_s: 600
{extra}
"""


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool not found: scripts/setup.sh test installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ static checks (no services)
def test_metric_names_follow_prometheus_conventions():
    names = [m.name for m in metrics.ALL_METRICS]
    assert len(names) == len(set(names)), "a metric is defined twice"
    for m in metrics.ALL_METRICS:
        assert re.fullmatch(r"farm_[a-z0-9_]+", m.name), m.name
        if m.kind == "counter":
            assert m.name.endswith("_total"), m.name
        if m.kind == "histogram":
            assert m.name.endswith("_seconds") and m.buckets == tuple(sorted(m.buckets)), m.name
        # Unbounded values never become labels.
        assert not {"task", "task_id", "prompt", "seed", "output", "error"} & set(m.labels), m.name
        assert "job" not in m.labels, "Prometheus owns 'job' (the scrape job); farm's is job_id"
    sources = {m.source for m in metrics.ALL_METRICS}
    assert sources == {"controller", "renderer"}


def test_promtool_accepts_the_scrape_config_and_alert_rules(tmp_path, monkeypatch):
    deploy = REPO / "deploy" / "prometheus"
    result = promtool("check", "config", str(deploy / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("test", "rules", str(deploy / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # The config `farm monitor up` writes from it is valid too.
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    generated = tmp_path / "prometheus.yml"
    generated.write_text(yaml.safe_dump(monitor.prometheus_config("127.0.0.1:9400", scrape_interval="5s")))
    result = promtool("check", "config", str(generated))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_tests_fail_when_a_rule_is_broken(tmp_path):
    """The promtool rule tests can fail: with a threshold changed they do."""
    deploy = REPO / "deploy" / "prometheus"
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("> 0.2", "> 0.6"))
    shutil.copy(deploy / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0 and "FarmHighFailureRate" in result.stdout + result.stderr


def dashboard_variables(board: dict) -> dict[str, dict]:
    return {v["name"]: v for v in board["templating"]["list"]}


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_structure(path):
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    variables = dashboard_variables(board)
    assert variables.get("datasource", {}).get("type") == "datasource", "no datasource variable"
    assert variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: hard-wired datasource"
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used |= set(re.findall(r"\$\{?(\w+)", target["expr"]))
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"
            used |= set(re.findall(r"\$\{?(\w+)", var["definition"]))
    used.add("datasource")
    dangling = used - set(variables) - GRAFANA_BUILTINS
    assert not dangling, f"{path.name} uses undefined variables {dangling}"
    unused = set(variables) - used
    assert not unused, f"{path.name} defines variables no query uses: {unused}"
    # Panels do not overlap on the grid.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_three_dashboards_and_provisioning_exist():
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS}
    assert uids == {"farm-overview", "farm-pools", "farm-job"}
    job_vars = dashboard_variables(json.loads((REPO / "dashboards" / "farm-job.json").read_text()))
    assert job_vars["job_id"]["definition"] == "label_values(farm_job_info, job_id)"
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "farm.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "farm.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "${FARM_DASHBOARDS_DIR}"


# ------------------------------------------------------------------ live: Ray cluster + Prometheus
class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(1)
        raise AssertionError(f"Prometheus had no data for {expr} after {timeout:g}s")


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    return {r["alert"]: r["expr"] for r in rules}


def write_job(tmp: Path, name: str, n: int, retries: int = 1, extra: str = "") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(JOB.format(name=name, ns=", ".join(str(i) for i in range(n)), retries=retries, extra=extra))
    return path


@pytest.fixture(scope="module")
def observed(ray_session, tmp_path_factory):
    """Runs the scenario once: a two-pool cluster with Ray's dashboard (it writes the service-
    discovery file), farm's exporter on a free loopback port, Prometheus started by `farm monitor`
    scraping both every second. Jobs: a healthy one, one whose attempts all fail, one that hangs
    on the big pool (then cancelled). Facts are collected along the way for the tests below."""
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("observed")
    saved = {k: os.environ.get(k) for k in ("FARM_HOME", "FARM_METRICS_ADDRESS", "FARM_CLUSTER_CONFIG")}
    os.environ["FARM_HOME"] = str(tmp / "home")
    os.environ["FARM_METRICS_ADDRESS"] = f"127.0.0.1:{free_port()}"
    # The pools as node types of an autoscaler config, so the controller sizes them (one node each).
    config = tmp / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "available_node_types": {
                    "small": {"resources": {"CPU": 2, **SMALL}, "min_workers": 1, "max_workers": 1},
                    "big": {"resources": {"CPU": 1, **BIG}, "min_workers": 1, "max_workers": 1},
                }
            }
        )
    )
    os.environ["FARM_CLUSTER_CONFIG"] = str(config)
    if ray_session.is_initialized():
        ray_session.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    )
    cluster.add_node(num_cpus=2, resources=SMALL)
    cluster.add_node(num_cpus=1, resources=BIG)
    cluster.wait_for_nodes()
    ray_session.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    session_dir = ray_session._private.worker._global_node.get_session_dir_path()
    facts: dict = {}
    try:
        services = monitor.up(
            prometheus_port=free_port(),
            grafana_port=free_port(),
            service_discovery_file=str(Path(session_dir) / "prom_metrics_service_discovery.json"),
            scrape_interval="1s",
        )
        prom = Prometheus(services[0].url)
        facts["prom"] = prom
        alerts = alert_exprs()

        healthy = api.submit(write_job(tmp, "healthy", 8, extra="deadline: 1h"), address="auto")
        facts["healthy"] = healthy
        prom.wait_for(f'farm_job_tasks{{job_id="{healthy.job_id}", state="succeeded"}} == 8')
        facts["after_healthy"] = {name: prom.query(expr) for name, expr in alerts.items()}

        write_faults(
            FAULTS_FILE,
            Fault(prompt_contains="failing", action="raise"),
            Fault(prompt_contains="stuck", action="hang", hang_s=120),
        )
        failing = api.submit(write_job(tmp, "failing", 4), address="auto")
        facts["failing"] = failing
        prom.wait_for(f'farm_job_tasks{{job_id="{failing.job_id}", state="failed"}} == 4')
        # Renderer metrics travel through Ray's agents (reported every few seconds).
        prom.wait_for("sum(ray_farm_frames_total) >= 40")
        # rate() needs two samples of a series; Ray's agents report every few seconds.
        prom.wait_for("min(count_over_time(ray_farm_render_seconds_count[5m])) >= 2")
        prom.wait_for("min(count_over_time(ray_node_cpu_utilization[5m])) >= 2")
        facts["after_failing"] = {name: prom.query(expr) for name, expr in alerts.items()}
        facts["exposition"] = (
            urllib.request.urlopen(f"http://{os.environ['FARM_METRICS_ADDRESS']}/metrics", timeout=10).read().decode()
        )
        facts["dashboards"] = {
            path.stem: [
                (title, expr, prom.query(substitute(expr, healthy.job_id)))
                for title, expr in dashboard_exprs(json.loads(path.read_text()))
            ]
            for path in DASHBOARDS
        }

        # A job that needs the big pool and hangs there: the small pool's renderers sit idle.
        stuck_path = write_job(tmp, "stuck", 6, extra="requirements: {min_vram_gb: 40}\ndeadline: 5s")
        box: dict = {}
        thread = threading.Thread(
            target=lambda: box.update(outcome=api.submit(stuck_path, address="auto")), daemon=True
        )
        thread.start()
        stuck_id = wait_for_job(tmp / "home" / "catalog", "stuck")
        facts["stuck_id"] = stuck_id
        prom.wait_for(f'farm_job_tasks{{job_id="{stuck_id}", state="running"}} > 0')
        facts["stalled"] = prom.wait_for(alerts["FarmJobStalled"])
        facts["idle_queued"] = prom.wait_for(alerts["FarmPoolIdleWhileQueued"])
        facts["deadline_risk"] = prom.wait_for(alerts["FarmJobDeadlineAtRisk"])
        api.cancel(stuck_id, address="auto")
        thread.join(timeout=120)
        prom.wait_for(f'farm_job_info{{job_id="{stuck_id}", state="cancelled"}}')
        time.sleep(2)
        facts["after_cancel"] = {name: prom.query(expr) for name, expr in alerts.items()}
        yield facts
    finally:
        write_faults(FAULTS_FILE)
        monitor.down()
        from tests.conftest import stop_controller

        if ray_session.is_initialized():
            stop_controller(ray_session)
            ray_session.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def substitute(expr: str, job_id: str) -> str:
    """What Grafana does to a panel's query before sending it."""
    return expr.replace("$__rate_interval", "5m").replace("$job_id", job_id).replace("$pool", ".*")


def wait_for_job(catalog_root: Path, campaign: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if catalog_root.exists():
            ids = [j.job_id for j in Catalog(catalog_root).jobs() if j.campaign == campaign]
            if ids:
                return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"no {campaign} job in the catalog")


def test_every_dashboard_query_returns_data(observed):
    empty = []
    for board, panels in observed["dashboards"].items():
        for title, expr, result in panels:
            metric_names = set(re.findall(r"\b(?:farm|ray)_[a-z0-9_]+", expr))
            if not result and not (metric_names and metric_names <= GPU_ONLY | {n + "_bucket" for n in GPU_ONLY}):
                empty.append(f"{board} / {title}: {expr}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def test_gpu_panels_use_metrics_ray_really_exports():
    import ray

    source = (Path(ray.__file__).parent / "dashboard" / "modules" / "reporter" / "reporter_agent.py").read_text()
    for name in GPU_ONLY:
        assert f'"{name.removeprefix("ray_")}"' in source, f"Ray exports no {name}"


def test_metrics_agree_with_the_catalog(observed):
    prom, healthy, failing = observed["prom"], observed["healthy"], observed["failing"]
    assert healthy.run.succeeded == 8 and failing.run.failed == 4
    job_ok = prom.value(f'sum(farm_job_attempts_total{{job_id="{healthy.job_id}", status="succeeded"}})')
    assert job_ok == 8
    assert prom.value(f'sum(farm_job_attempts_total{{job_id="{failing.job_id}", status="failed"}})') == 8
    assert prom.value('sum(farm_attempts_total{status="succeeded"})') == 8
    assert prom.value('sum(farm_attempt_failures_total{reason="render"})') == 8  # 4 tasks × 2 attempts
    assert prom.value("sum(farm_retries_total)") == 4
    # From the renderers, through Ray's agents: 8 clips × 5 frames at 8 fps.
    assert prom.value("sum(ray_farm_frames_total)") == 40
    assert prom.value("sum(ray_farm_video_seconds_total)") == pytest.approx(5.0)
    assert prom.value("sum(ray_farm_render_seconds_count)") == 8
    loads = prom.value("sum(farm_model_loads_total)")
    assert loads == prom.value("sum(ray_farm_model_load_seconds_count)") >= 1
    assert prom.value('farm_pool_cost_dollars_per_hour{pool="small"}') == pytest.approx(1.6)
    assert prom.value('farm_pool_cost_dollars_per_hour{pool="big"}') == pytest.approx(4.0)
    assert prom.value(f'farm_job_progress_ratio{{job_id="{healthy.job_id}"}}') == 1.0
    # Scaling, as the controller sees it: one node per pool alive and asked for (min = max = 1).
    assert prom.value('farm_pool_nodes{pool="small"}') == prom.value('farm_pool_target_nodes{pool="small"}') == 1
    assert prom.value('farm_pool_nodes{pool="big"}') == prom.value('farm_pool_target_nodes{pool="big"}') == 1
    assert 3000 < prom.value(f'farm_job_deadline_seconds{{job_id="{healthy.job_id}"}}') <= 3600


def test_promtool_accepts_the_exposition(observed):
    result = subprocess.run(
        [shutil.which("promtool"), "check", "metrics"],
        input=observed["exposition"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "farm_job_tasks{" in observed["exposition"]


def test_alerts_fire_when_provoked_and_not_otherwise(observed):
    after_healthy, after_failing, after_cancel = (
        observed[k] for k in ("after_healthy", "after_failing", "after_cancel")
    )
    # A healthy finished job: nothing fires.
    assert after_healthy == {
        "FarmJobStalled": [],
        "FarmHighFailureRate": [],
        "FarmPoolIdleWhileQueued": [],
        "FarmJobDeadlineAtRisk": [],
    }
    # Every attempt of the second job failed: the failure rate fires, for the pools it ran on.
    assert {r["metric"]["pool"] for r in after_failing["FarmHighFailureRate"]} <= {"small", "big"}
    assert after_failing["FarmHighFailureRate"]
    assert after_failing["FarmJobStalled"] == [] and after_failing["FarmPoolIdleWhileQueued"] == []
    assert after_failing["FarmJobDeadlineAtRisk"] == []  # its deadline-free job failed, the healthy one made it
    # The hanging job: stalled (nothing finishes), and the small pool idles while its tasks queue.
    assert [r["metric"]["job_id"] for r in observed["stalled"]] == [observed["stuck_id"]]
    assert {r["metric"]["pool"] for r in observed["idle_queued"]} == {"small"}
    # Its 5 s deadline passed with all six tasks left.
    assert [r["metric"]["job_id"] for r in observed["deadline_risk"]] == [observed["stuck_id"]]
    assert float(observed["deadline_risk"][0]["value"][1]) < 0
    # Cancelled: nothing left to do, so neither fires any more.
    assert after_cancel["FarmJobStalled"] == [] and after_cancel["FarmPoolIdleWhileQueued"] == []
    assert after_cancel["FarmJobDeadlineAtRisk"] == []


def test_farm_monitor_up_status_down(tmp_path, monkeypatch):
    """The command a user runs: Prometheus on loopback with farm's rules loaded, then stopped."""
    from typer.testing import CliRunner

    from farm.cli import app

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_METRICS_ADDRESS", "0.0.0.0:9555")  # a controller open to the network…
    port = free_port()
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["monitor", "up", "--prometheus-port", str(port), "--grafana-port", str(free_port())])
        assert up.exit_code == 0, up.output
        assert f"prometheus: running http://127.0.0.1:{port}" in up.output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as r:
            rules = json.load(r)["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == set(alert_exprs())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=10) as r:
            assert "- 127.0.0.1:9555" in json.load(r)["data"]["yaml"]  # …is still scraped on loopback
        again = runner.invoke(app, ["monitor", "up", "--prometheus-port", str(port)])
        assert "already running" in again.output
        assert "prometheus: running" in runner.invoke(app, ["monitor", "status"]).output
    finally:
        down = runner.invoke(app, ["monitor", "down"])
    assert down.exit_code == 0 and "stopped" in down.output
    assert "prometheus: not running" in runner.invoke(app, ["monitor", "status"]).output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)


def test_farm_monitor_without_prometheus_is_one_clear_line(tmp_path):
    import sys

    env = {**os.environ, "FARM_HOME": str(tmp_path), "PATH": str(tmp_path)}  # a PATH without prometheus
    result = subprocess.run(
        [sys.executable, "-m", "farm.cli", "monitor", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: prometheus is not installed — install it (Debian/Ubuntu: apt-get install prometheus) or download "
        "it from prometheus.io, then run farm monitor up again"
    ]
