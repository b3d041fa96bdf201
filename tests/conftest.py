"""Shared fixtures. Real parts throughout: the real tiny Wan model, a real local Ray, real files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from farm.faults import Fault, write_faults

# Test-only fault injection (farm/faults.py): every Ray and renderer the tests start inherits this
# variable, so the faults a test writes reach renderers in any process of any test cluster.
FAULTS_FILE = Path(tempfile.mkdtemp(prefix="farm-faults-")) / "faults.json"
os.environ["FARM_TEST_FAULTS"] = str(FAULTS_FILE)
write_faults(FAULTS_FILE)


@pytest.fixture
def faults():
    """Set the faults renderers inject for this test (e.g. ``faults(Fault("clip", action="slow",
    hang_s=0.3))``); none are left for the next test."""

    def set_faults(*chosen: Fault) -> None:
        write_faults(FAULTS_FILE, *chosen)

    yield set_faults
    write_faults(FAULTS_FILE)


@pytest.fixture(scope="session", autouse=True)
def _remove_faults_file():
    yield
    shutil.rmtree(FAULTS_FILE.parent, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory) -> Path:
    """Build the tiny model once per session (the same code path users get), shared by every test."""
    root = tmp_path_factory.mktemp("models")
    os.environ["FARM_MODELS_DIR"] = str(root)
    # Controllers started by tests serve metrics on a free port, never a running farm's 9400.
    os.environ.setdefault("FARM_METRICS_ADDRESS", "127.0.0.1:0")
    return root


@pytest.fixture
def farm_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "farm-home"
    monkeypatch.setenv("FARM_HOME", str(home))
    return home


@pytest.fixture
def write_manifest(tmp_path):
    """Write a manifest from an indented string; returns its path."""

    def write(text: str, name: str = "manifest.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Ray for the session's integration tests (token auth on, as Ray ≥ 2.59 does).

    Ray workers inherit the environment at ray.init, so the S3 server's endpoint and credentials
    are exported first: renderers reach S3 through boto3's usual chain, as on a real node."""
    import ray

    os.environ.update(s3_server.env)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the session; stopped at the end."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server with its endpoint and credentials in the environment (as a user would set
    them), and a fresh bucket for this test."""
    import uuid

    if s3_server.process is None:  # a test stopped it; the next one gets it back
        s3_server.start()
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)  # no-ops once ray_local exported them for the session
    bucket = f"farm-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.bucket = bucket
    return s3_server


@pytest.fixture
def ray_local(ray_session):
    """A local Ray (started once, again after a multi-node test replaced it), with no farm
    controller left from an earlier test: each test has its own catalog, a controller serves one."""
    if not ray_session.is_initialized():
        ray_session.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray_session
    stop_controller(ray_session)


def stop_controller(ray) -> None:
    from farm.controller import CONTROLLER_NAME, NAMESPACE

    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    ray.get(controller.shutdown.remote(), timeout=60)
    ray.kill(controller, no_restart=True)
