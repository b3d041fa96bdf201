"""Every default in one place, and where farm keeps its files ($FARM_HOME)."""

from __future__ import annotations

import os
from pathlib import Path

FARM_HOME_ENV = "FARM_HOME"
DEFAULT_FARM_HOME = "./farm-data"

# Render settings a manifest may leave out: small enough for the embedded model on a CPU.
DEFAULT_WIDTH = 64
DEFAULT_HEIGHT = 64
DEFAULT_FRAMES = 9
DEFAULT_FPS = 8
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 5.0
DEFAULT_RETRIES = 2
# An attempt running longer than this has its renderer stopped and replaced (manifest: timeout_s).
DEFAULT_TASK_TIMEOUT_S = 900.0
DEFAULT_MODEL = "tiny"

# Dispatch: tasks queued at each renderer beyond the one it is rendering, so it never waits
# for the driver between clips, yet a job is never handed to Ray all at once.
IN_FLIGHT_PER_RENDERER = 2
# Failed attempts wait before their retry: base * 2**(attempt-1), capped.
RETRY_BACKOFF_BASE_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0
# Catalog rows are written in batches: at most this many rows or this many seconds lost on a crash.
CATALOG_BATCH_ROWS = int(os.environ.get("FARM_CATALOG_BATCH_ROWS", "32"))
CATALOG_BATCH_SECONDS = float(os.environ.get("FARM_CATALOG_BATCH_SECONDS", "5"))
# CPUs each renderer reserves when there is no GPU; torch uses as many threads.
CPUS_PER_CPU_RENDERER = 1
# Seconds to wait for a Ray head's port before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0
# The controller's Prometheus metrics: loopback unless FARM_METRICS_ADDRESS opens them up.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9400"
# Seconds to wait for the hub before calling it unreachable.
HUB_CONNECT_TIMEOUT_S = 5.0
# Autoscaling (farm/scaling.py): seconds one renderer slot takes per clip until a pool has measured
# its own, and how long a pool's backlog stays empty before its nodes are let go down to min_workers.
DEFAULT_SECONDS_PER_CLIP = 60.0
SCALE_DOWN_IDLE_S = float(os.environ.get("FARM_SCALE_DOWN_IDLE_S", "300"))
# How often the controller recomputes the workers each pool needs and tells Ray's autoscaler.
AUTOSCALE_INTERVAL_S = float(os.environ.get("FARM_AUTOSCALE_INTERVAL_S", "5"))


def farm_home() -> Path:
    return Path(os.environ.get(FARM_HOME_ENV, DEFAULT_FARM_HOME)).expanduser().resolve()


def catalog_location() -> str:
    """The catalog: FARM_CATALOG (a local path or s3://bucket/prefix), else $FARM_HOME/catalog."""
    return os.environ.get("FARM_CATALOG") or str(farm_home() / "catalog")


def cluster_catalog_location() -> str:
    """The catalog of a controller no client named one for, read where the controller runs (the
    head node): its FARM_CATALOG, else $FARM_HOME/catalog with FARM_HOME defaulting to
    ~/farm-data, not a folder relative to whatever directory Ray runs its workers in."""
    if os.environ.get("FARM_CATALOG"):
        return os.environ["FARM_CATALOG"]
    return str(Path(os.environ.get(FARM_HOME_ENV, "~/farm-data")).expanduser().resolve() / "catalog")


def models_dir() -> Path:
    """Built-in models are built here once; FARM_MODELS_DIR shares one cache between farm homes."""
    shared = os.environ.get("FARM_MODELS_DIR")
    return Path(shared).expanduser().resolve() if shared else farm_home() / "models"


def metrics_address() -> str:
    """Where the controller serves its Prometheus metrics: FARM_METRICS_ADDRESS (HOST:PORT, or
    "off"), else loopback only — open it to a network deliberately, e.g. 0.0.0.0:9400."""
    value = os.environ.get("FARM_METRICS_ADDRESS", DEFAULT_METRICS_ADDRESS).strip()
    return "" if value.lower() in ("", "off", "none") else value


def outputs_dir() -> Path:
    return farm_home() / "outputs"
