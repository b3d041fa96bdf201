"""`farm cluster check|up|down|status` (farm/launcher.py) on cluster.yaml: every bad config is one
line naming the file and field, the cluster's token is created once and kept private, and a
launcher failure (here: no cloud to reach, the real `ray up` against a refused AWS endpoint) ends in
one line, not Ray's traceback. Nothing here can reach a cloud, so no node is ever launched."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
FARM = [sys.executable, "-m", "farm.cli"]


@pytest.fixture
def home(tmp_path):
    """A HOME of its own: the token file lands under it, never in the user's."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def farm(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environ.update(HOME=str(home), FARM_HOME=str(home / "farm-data"), **(env or {}))
    return subprocess.run([*FARM, *args], capture_output=True, text=True, timeout=240, env=environ, cwd=ROOT)


def _variant(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    edit(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_accepts_the_shipped_cluster_yaml(home):
    result = farm(home, "cluster", "check")
    assert result.returncode == 0, result.stderr
    assert "gpu24 (A10G 24 GB, $1.01/h per slot, 0–8 'gpu24' nodes)" in result.stdout
    assert "a100_80 (A100 80 GB, $5.12/h per slot" in result.stdout
    assert not (home / ".farm").exists()  # checking creates nothing


def _drop_token_auth(config):
    config["worker_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token ", "") for c in config["worker_start_ray_commands"]
    ]


def _token_auth_only_in_a_comment(config):
    config["head_start_ray_commands"] = [
        "ray stop  # RAY_AUTH_MODE=token",
        "ray start --head --port=6379 --dashboard-host=127.0.0.1",
    ]


def _token_auth_overridden(config):
    config["worker_start_ray_commands"] = [
        c.replace("ray start", "RAY_AUTH_MODE=disabled ray start") for c in config["worker_start_ray_commands"]
    ]


def _no_pools(config):
    for spec in config["available_node_types"].values():
        spec["resources"] = {k: v for k, v in spec["resources"].items() if not k.startswith("farm_pool:")}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["available_node_types"]["l4"].update(max_workers="many"),
            "available_node_types.l4.max_workers: Ray's cluster schema rejects it: 'many' is not of type 'integer'",
        ),
        (lambda c: c.update(head_node_type="nowhere"), "Ray's cluster launcher rejects it"),
        (_drop_token_auth, "worker_start_ray_commands: starts Ray without token authentication"),
        (_token_auth_only_in_a_comment, "head_start_ray_commands: starts Ray without token authentication"),
        (_token_auth_overridden, "worker_start_ray_commands: starts Ray without token authentication"),
        (
            lambda c: c["available_node_types"]["l4"].update(min_workers=9),
            "available_node_types.l4: min_workers 9 and max_workers 8 do not make a range",
        ),
        (lambda c: c.update(file_mounts=["~/.farm/ray-token"]), "Ray's cluster"),
        (lambda c: c["provider"].update(type="nowhere-cloud"), "Ray's cluster launcher rejects it"),
        (_no_pools, "available_node_types: no worker node type offers a farm pool"),
        (lambda c: c.update(file_mounts={}), "file_mounts: the nodes read the Ray token from"),
    ],
    ids=[
        "schema",
        "head-type",
        "no-token-auth",
        "token-auth-in-a-comment",
        "token-auth-overridden",
        "min-above-max",
        "file-mounts-list",
        "unknown-provider",
        "no-pools",
        "token-not-mounted",
    ],
)
@pytest.mark.parametrize("command", ["check", "up"])
def test_bad_config_is_one_line_exit_2(home, tmp_path, edit, expected, command):
    path = _variant(tmp_path, edit)
    result = farm(home, "cluster", command, str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and " — " in lines[0], result.stderr
    assert expected in lines[0]
    assert not (home / ".farm").exists()  # a rejected config launches nothing and writes no token


def test_yaml_syntax_error_names_the_line(home, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster_name: farm\nprovider: {type: aws\nmax_workers: 2\n")
    result = farm(home, "cluster", "check", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}:3: not valid YAML"), result.stderr


def test_missing_config(home, tmp_path):
    result = farm(home, "cluster", "status", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "no such cluster config" in result.stderr


def test_up_without_cloud_credentials_creates_the_token_and_fails_in_one_line(home):
    result = farm(home, "cluster", "up")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: cluster.yaml: provider: no AWS credentials found for the cluster launcher — run 'aws configure'"
        )
    )
    token = home / ".farm" / "ray-token" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    value = token.read_text()
    assert len(value) == 64 and int(value, 16) > 0  # 256 random bits, as `ray get-auth-token --generate`
    again = farm(home, "cluster", "up")
    assert again.returncode == 2 and token.read_text() == value  # never replaced: running nodes use it
    assert "created the cluster's Ray token" in result.stderr and "created" not in again.stderr


def test_launcher_failure_is_its_last_line_without_the_traceback(home):
    """The real `ray up`, with credentials but an AWS endpoint that refuses connections."""
    cloud = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "example",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "BOTO_MAX_RETRIES": "0",
    }  # Ray's own retry count for the launcher's boto clients
    result = farm(home, "cluster", "up", env=cloud)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cluster.yaml: 'ray up' failed (exit 1): "), last
    assert "Could not connect to the endpoint URL" in last
    log = home / "farm-data" / "launcher" / "farm-up.log"
    assert f"the launcher's full output is in {log}" in last
    assert "Traceback (most recent call last)" in log.read_text()  # kept for whoever debugs it
    assert "Cluster: farm" in result.stderr.replace("\x1b[37m", "").replace("\x1b[39m", "").replace(
        "\x1b[1m", ""
    ).replace("\x1b[22m", "")  # the launcher's progress is shown as it runs


def test_down_needs_only_rays_checks_so_an_edited_config_can_still_stop_the_nodes(home, tmp_path):
    path = _variant(tmp_path, _drop_token_auth)
    assert farm(home, "cluster", "up", str(path)).returncode == 2  # never launched like this …
    down = farm(home, "cluster", "down", str(path))  # … but tearing down goes on to the launcher
    assert down.returncode == 2 and "no AWS credentials found" in down.stderr, down.stderr


def test_an_existing_token_readable_by_others_is_made_private(home):
    token = home / ".farm" / "ray-token" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("a" * 64)
    token.chmod(0o644)  # as `cp ~/.ray/auth_token` leaves it
    farm(home, "cluster", "up")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64
