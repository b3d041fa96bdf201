"""Shared fixtures. Real parts throughout: the real tiny Wan model, a real local Ray, real files."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory) -> Path:
    """Build the tiny model once per session (the same code path users get), shared by every test."""
    root = tmp_path_factory.mktemp("models")
    os.environ["FARM_MODELS_DIR"] = str(root)
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
def ray_local():
    """One local Ray for the session's integration tests (token auth on, as Ray ≥ 2.59 does)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()
