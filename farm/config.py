"""Every default, and every ``FARM_*`` environment variable, in one place.

Nothing else in farm reads ``FARM_*`` or defines a second default. A variable with an invalid
value does not stop the import (that would be a traceback): the default is used and
``check_environment()``, which the CLI calls first, reports it as one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from farm.errors import FarmError

# ----------------------------------------------------------------------------- environment

_ENV_PROBLEMS: list[str] = []


def _env_number(name: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> float:
    """A numeric FARM_* variable, else ``default``; a bad value is remembered for check_environment."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
        if not math.isfinite(value) or value < minimum:
            raise ValueError
    except ValueError:
        kind = "a whole number" if integer else "a number"
        _ENV_PROBLEMS.append(f"{name}={raw!r} is not {kind} ≥ {minimum:g}")
        return default
    return value


def check_environment() -> None:
    """Raise one FarmError for the first FARM_* variable that has an invalid value."""
    if _ENV_PROBLEMS:
        raise FarmError(_ENV_PROBLEMS[0], field="environment", hint="fix or unset the variable")


FARM_HOME_ENV = "FARM_HOME"
DEFAULT_FARM_HOME = "./farm-data"
# Test-only fault injection (farm/faults.py): faults as JSON, or a JSON file's path. Never set in production.
TEST_FAULTS_ENV = "FARM_TEST_FAULTS"

# ----------------------------------------------------------------------------- manifests

# Render settings a manifest may leave out: small enough for the embedded model on a CPU.
DEFAULT_WIDTH = 64
DEFAULT_HEIGHT = 64
DEFAULT_FRAMES = 9
DEFAULT_FPS = 8
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 5.0
DEFAULT_RETRIES = 2
DEFAULT_PRIORITY = 0
# An attempt running longer than this has its renderer stopped and replaced (manifest: timeout_s).
DEFAULT_TASK_TIMEOUT_S = 900.0
DEFAULT_MODEL = "tiny"
# Limits on untrusted manifests (farm/yamlfile.py, farm/expand.py): what a real campaign never
# needs, checked before anything is expanded, so a hostile file is refused in well under a second.
MAX_MANIFEST_BYTES = 10 * 2**20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # values once aliases are expanded
MAX_TASKS = int(_env_number("FARM_MAX_TASKS", 1_000_000, minimum=1, integer=True))
# A deadline: at most this far ahead (a longer one is a typo more often than a plan).
MAX_DEADLINE_S = 366 * 86400
# Inputs (image:, last_image:, video:): checked when the manifest is validated.
MAX_INPUT_BYTES = 2 * 2**30  # one image or video file
MIN_INPUT_SIDE = 16  # pixels: smaller is no picture to condition on
MAX_INPUT_SIDE = 16384
MAX_INPUT_FRAMES = 100_000  # a source video's frames decoded at most
# Sequences: shots per sequence, and the frames a cut overlaps (a later segment's first frame
# continues, or shares, its predecessor's last: it is trimmed when the film is stitched).
MAX_SHOTS = 1000
SEQUENCE_OVERLAP_FRAMES = 1

# ----------------------------------------------------------------------------- outputs (S3)

S3_MULTIPART_THRESHOLD_MB = 64
S3_MULTIPART_CHUNK_MB = 16
S3_MAX_ATTEMPTS = 5  # botocore retries throttling and 5xx with backoff up to this many tries
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0
# Checking that done clips are still there (farm/verify.py): this many names or more are looked up by
# listing the prefix (1000 keys a request), fewer by HEADs, this many at a time.
S3_LIST_FROM = 200
S3_HEAD_THREADS = 16

# ----------------------------------------------------------------------------- scheduling

# Dispatch: tasks queued at each renderer beyond the one it is rendering, so it never waits
# for the driver between clips, yet a job is never handed to Ray all at once.
IN_FLIGHT_PER_RENDERER = 2
# Short tasks go to a renderer in batches of about this much measured work, at most MAX_BATCH
# tasks (farm/scheduler.py): a Ray call costs the controller ~1 ms, a 50 ms clip should not pay
# it alone. Long clips (most real ones) go one a call; a batch's results come back together.
BATCH_TARGET_S = 0.5
MAX_BATCH = 32
# Clips a GPU renderer works on at once (farm/pipelining.py): one generating while the one before
# is encoded and uploaded. At most IN_FLIGHT_PER_RENDERER. CPU renderers take one at a time: there
# the encoder would take the cores the model runs on.
RENDER_PIPELINE_DEPTH = 2
# Failed attempts wait before their retry: base * 2**(attempt-1), capped.
RETRY_BACKOFF_BASE_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0
# A task on this many renderers that died fails (it is probably what kills them).
MAX_INTERRUPTIONS = 3
# A renderer slot that failed this many attempts of a job gets none of that job's tasks again.
BAD_SLOT_LIMIT = 3
# Running attempts of a cancelled job get this long before their renderer is stopped.
CANCEL_GRACE_S = 2.0
# The controller's loop: the longest a turn blocks waiting for results, how often it reads the
# cluster's nodes for pools, how many finished jobs' final progress it keeps answering for.
CONTROLLER_WAIT_S = 0.2
POOL_REFRESH_S = 2.0
FINISHED_JOBS_KEPT = 1000
# Catalog rows are written in batches: at most this many rows or this many seconds lost on a crash
# (clips finished meanwhile are adopted from their commit markers, not rendered again). A file is
# fsynced: 256 rows a file cost the controller 16 µs a row, 32 cost 80.
CATALOG_BATCH_ROWS = int(_env_number("FARM_CATALOG_BATCH_ROWS", 256, minimum=1, integer=True))
CATALOG_BATCH_SECONDS = _env_number("FARM_CATALOG_BATCH_SECONDS", 5.0)
# How often a submit following its job asks the controller for progress: each ask is a Ray call
# the controller answers (~1 ms of its CPU); twice a second keeps a progress bar live.
FOLLOW_POLL_S = 0.5
# CPUs each renderer reserves when there is no GPU; torch uses as many threads.
CPUS_PER_CPU_RENDERER = 1
# Seconds to wait for a Ray head's port before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0
# One embedded farm per local catalog (farm/embedded.py): how often a submit that joined one reads
# its job's progress and checks that the farm's owner lives, and how long it waits for a farm
# that is starting (or stopping) before it gives up with an error.
EMBEDDED_POLL_S = 0.25
EMBEDDED_JOIN_WAIT_S = _env_number("FARM_EMBEDDED_JOIN_WAIT_S", 300.0, minimum=1.0)
# Filesystems whose locks cannot be trusted to coordinate embedded farms (mount types, as Linux
# names them): an embedded submit on a catalog there is refused in favour of a shared cluster.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs"}
    | {"davfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs", "fuse.juicefs"}
)
# Seconds to wait for the hub before calling it unreachable.
HUB_CONNECT_TIMEOUT_S = 5.0

# ----------------------------------------------------------------------------- scaling and metrics

# The controller's Prometheus metrics: loopback unless FARM_METRICS_ADDRESS opens them up.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9400"
# Autoscaling (farm/scaling.py): seconds one renderer slot takes per clip until a pool has measured
# its own, and how long a pool's backlog stays empty before its nodes are let go down to min_workers.
DEFAULT_SECONDS_PER_CLIP = 60.0
# A finished job's metric series stay this long, so dashboards show how it ended.
FINISHED_JOB_TTL_S = 3600.0
SCALE_DOWN_IDLE_S = _env_number("FARM_SCALE_DOWN_IDLE_S", 300.0)
# How often the controller recomputes the workers each pool needs and tells Ray's autoscaler.
AUTOSCALE_INTERVAL_S = _env_number("FARM_AUTOSCALE_INTERVAL_S", 5.0, minimum=0.01)

# ----------------------------------------------------------------------------- places


def farm_home() -> Path:
    return Path(os.environ.get(FARM_HOME_ENV, DEFAULT_FARM_HOME)).expanduser().resolve()


def catalog_location() -> str:
    """The catalog: FARM_CATALOG (a local path or s3://bucket/prefix), else $FARM_HOME/catalog."""
    return os.environ.get("FARM_CATALOG") or str(farm_home() / "catalog")


def catalog_named() -> bool:
    """Whether this process was told where the catalog is (FARM_CATALOG or FARM_HOME)."""
    return bool(os.environ.get("FARM_CATALOG") or os.environ.get(FARM_HOME_ENV))


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


def input_cache_dir() -> Path:
    """This node's inputs, fetched once and kept by content hash."""
    return farm_home() / "cache" / "inputs"


def metrics_address() -> str:
    """Where the controller serves its Prometheus metrics: FARM_METRICS_ADDRESS (HOST:PORT, or
    "off"), else loopback only — open it to a network deliberately, e.g. 0.0.0.0:9400."""
    value = os.environ.get("FARM_METRICS_ADDRESS", DEFAULT_METRICS_ADDRESS).strip()
    return "" if value.lower() in ("", "off", "none") else value


def outputs_dir() -> Path:
    return farm_home() / "outputs"


def check_places(paths: list[Path]) -> None:
    """Create the folders farm is about to write on this machine (the catalog, the models), and
    FARM_HOME first when they lie under it; an impossible one is one FarmError naming the variable
    that chose it, before anything renders."""
    home = farm_home()
    for path in [home, *paths] if any(p.is_relative_to(home) for p in paths) else paths:
        if path == home:
            variable = f"{FARM_HOME_ENV}={os.environ.get(FARM_HOME_ENV, DEFAULT_FARM_HOME)}"
        elif path == models_dir() and os.environ.get("FARM_MODELS_DIR"):
            variable = f"FARM_MODELS_DIR={os.environ['FARM_MODELS_DIR']}"
        elif os.environ.get("FARM_CATALOG") and not path.is_relative_to(home):
            variable = f"FARM_CATALOG={os.environ['FARM_CATALOG']}"
        else:
            variable = str(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):  # also catches a read-only mount, even for root
                raise PermissionError(13, "not writable")
        except OSError as exc:
            raise FarmError(
                f"{variable}: cannot create or write {path} ({exc.strerror or exc})",
                field="environment",
                hint="point it at a folder you can write",
            ) from None


def logs_dir() -> Path:
    """Where the CLI writes the full traceback of an unexpected error ($FARM_HOME/logs)."""
    return farm_home() / "logs"


def cluster_config_path() -> str | None:
    """A cluster-launcher config whose node types farm plans and scales for (FARM_CLUSTER_CONFIG)."""
    return os.environ.get("FARM_CLUSTER_CONFIG") or None


def deploy_dir(default: Path) -> Path:
    """Prometheus/Grafana configuration shipped with farm (FARM_DEPLOY_DIR overrides)."""
    return Path(os.environ.get("FARM_DEPLOY_DIR") or default)


def dashboards_dir(default: Path) -> Path:
    """Grafana dashboards shipped with farm (FARM_DASHBOARDS_DIR overrides)."""
    return Path(os.environ.get("FARM_DASHBOARDS_DIR") or default)


def fault_file() -> str | None:
    """Test-only: the faults farm/faults.py injects, as JSON or a file's path (None in production)."""
    return os.environ.get(TEST_FAULTS_ENV) or None
