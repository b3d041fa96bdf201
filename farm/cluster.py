"""Connect to Ray (or start an embedded one), discover renderer pools from node resources, start
renderer actors in them."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.config import CPUS_PER_CPU_RENDERER, RAY_CONNECT_TIMEOUT_S, RENDER_PIPELINE_DEPTH, cluster_config_path
from farm.errors import ClusterError
from farm.render import Renderer
from farm.task import ModelRef, Pool


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    embedded: bool  # started by farm for this process; shut down when it is done
    nodes: int
    cpus: float
    gpus: float


def connect(address: str | None = None, num_cpus: int | None = None) -> ClusterInfo:
    """Join the Ray cluster at ``address``, or start an embedded local one."""
    import ray

    embedded = False
    if not ray.is_initialized():
        quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address:
            _check_reachable(address)
            _check_authenticated(address)
            try:
                ray.init(address=address, **quiet)
            except Exception as exc:  # ConnectionError, auth failures, bad addresses
                raise ClusterError(
                    f"cannot connect to Ray at {address}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                    field="--address",
                    hint="start it with 'ray start --head', check the address, or omit --address "
                    "to use an embedded local Ray",
                ) from None
        else:
            # address="local": always a new embedded Ray, never a cluster that happens to run here.
            # Ray's dashboard process is what writes the Prometheus service-discovery file that
            # lists each node's metrics agent; it listens on loopback only.
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                **quiet,
            )
            embedded = True
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        embedded=embedded,
        nodes=len(nodes),
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
    )


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; a user deserves an answer in seconds."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--address {address!r} is not HOST:PORT",
            field="--address",
            hint="give the head node's GCS address, e.g. 10.0.0.5:6379",
        )
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray head at {address} ({exc.strerror or exc})",
            field="--address",
            hint="start one with 'ray start --head', check the address and firewall, or omit --address "
            "to use an embedded local Ray",
        ) from None


def _check_authenticated(address: str) -> None:
    """A cluster with token authentication refuses a client without its token: say so in one line,
    in a second, instead of Ray's retries and a bare "Failed to connect" twenty seconds later."""
    if address == "auto":
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not _token_available():
        # Ray's client would abort the whole process here (a failed internal check).
        raise ClusterError(
            "RAY_AUTH_MODE=token is set but this client has no token for the cluster",
            field="--address",
            hint="set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, or copy it to "
            "~/.ray/auth_token; see 'Security' in the README",
        )
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # Ray's own client, not in its stubs
    from ray.exceptions import AuthenticationError

    try:
        with _stderr_silenced():  # Ray's C++ client logs each refused attempt on stderr
            GcsClient(address=address)
    except AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {address} refused this client: token authentication is on and this "
            "client's token is missing or wrong",
            field="--address",
            hint="set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, or copy it to "
            "~/.ray/auth_token; see 'Security' in the README",
        ) from None
    except Exception:  # anything else: let ray.init report it
        return


def _token_available() -> bool:
    """Where Ray ≥ 2.52 looks for a client's token, in its order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    return Path(path).expanduser().is_file()


@contextlib.contextmanager
def _stderr_silenced():
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def disconnect(info: ClusterInfo) -> None:
    """Stop the embedded Ray farm started; leave a cluster farm only joined (or a caller's own) alone."""
    import ray

    if info.embedded and ray.is_initialized():
        ray.shutdown()


POOL_RESOURCE = "farm_pool:"  # farm_pool:<name> = renderer slots the node offers to that pool
GPU_TYPE_RESOURCE = "farm_gpu:"  # farm_gpu:<type> = 1
VRAM_RESOURCE = "farm_vram_gb"  # GPU memory of each of the node's GPUs
COST_RESOURCE = "farm_cost_cents_per_hour"  # what one renderer slot costs an hour (Ray wants whole numbers)
LOCAL_POOL = "local"


def pools_offered(resources: dict) -> list[tuple[Pool, int]]:
    """The pools a node with these resources offers, and its renderer slots in each."""
    gpu_type = next((k[len(GPU_TYPE_RESOURCE) :] for k in resources if k.startswith(GPU_TYPE_RESOURCE)), None)
    return [
        (
            Pool(
                key[len(POOL_RESOURCE) :],
                gpu_type,
                resources.get(VRAM_RESOURCE),
                float(resources.get(COST_RESOURCE, 0.0)) / 100,
            ),
            int(count),
        )
        for key, count in resources.items()
        if key.startswith(POOL_RESOURCE)
    ]


@dataclass(frozen=True)
class NodeType:
    """A worker node type the cluster's autoscaler can launch, and the farm pool its nodes join."""

    name: str
    pool: Pool
    slots_per_node: int
    min_workers: int
    max_workers: int


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head


def autoscaler_node_types(config_path: str | None = None) -> list[NodeType]:
    """The farm pools the autoscaler can start nodes for, from a cluster-launcher config:
    ``config_path``, else FARM_CLUSTER_CONFIG, else the copy `ray up` leaves on the head node.
    None found: the cluster is fixed-size (nothing to scale)."""
    import yaml

    path = Path(config_path or cluster_config_path() or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        if config_path:
            raise ClusterError(f"no cluster config at {path}", hint="give the cluster.yaml used with 'ray up'")
        return []
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(
            f"cannot read the cluster config {path}: {str(exc).splitlines()[0]}",
            hint="check it with 'ray up --no-restart' or fix the YAML",
        ) from None
    return node_types_of(config)


def node_types_of(config: dict) -> list[NodeType]:
    """The farm pools in a parsed cluster-launcher config, one entry per (node type, pool)."""
    out: list[NodeType] = []
    for name, spec in sorted((config.get("available_node_types") or {}).items()):
        lo, hi = int(spec.get("min_workers", 0)), int(spec.get("max_workers", config.get("max_workers", 0)))
        offered = pools_offered(spec.get("resources") or {})
        if offered and not 0 <= lo <= hi:
            raise ClusterError(
                f"min_workers {lo} and max_workers {hi} do not make a range",
                field=f"available_node_types.{name}",
                hint="use 0 <= min_workers <= max_workers",
            )
        out.extend(NodeType(name, pool, slots, lo, hi) for pool, slots in offered)
    return out


@dataclass(frozen=True)
class PoolCapacity:
    pool: Pool
    slots: int  # renderers the pool's alive nodes can host
    nodes: tuple[str, ...]
    gpus_per_slot: float


def discover_pools(nodes: list[dict] | None = None) -> list[PoolCapacity]:
    """Pools from the alive nodes' resources. A node joins pool P by offering ``farm_pool:P``
    (e.g. ``ray start --resources '{"farm_pool:l4": 2, "farm_gpu:L4": 1, "farm_vram_gb": 24,
    "farm_cost_cents_per_hour": 80}'``). A cluster without such resources is one pool, ``local``:
    one slot per GPU, or per CPU core without GPUs."""
    import ray

    alive = [n for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive")]
    pools: dict[str, dict] = {}
    for node in alive:
        resources = node.get("Resources", {})
        for pool, slots in pools_offered(resources):
            entry = pools.setdefault(
                pool.name, {"pool": pool, "slots": 0, "nodes": [], "gpus": resources.get("GPU", 0.0)}
            )
            entry["slots"] += slots
            entry["nodes"].append(node["NodeID"])
    if pools:
        return [
            PoolCapacity(e["pool"], e["slots"], tuple(e["nodes"]), 1.0 if e["gpus"] else 0.0)
            for _, e in sorted(pools.items())
        ]
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
    slots = int(gpus) if gpus >= 1 else int(cpus // CPUS_PER_CPU_RENDERER)
    if slots == 0:  # e.g. a head with CPU 0 before the autoscaler has started any worker
        return []
    gpu_type = "GPU" if gpus >= 1 else None
    return [
        PoolCapacity(
            Pool(LOCAL_POOL, gpu_type, None, 0.0), slots, tuple(n["NodeID"] for n in alive), 1.0 if gpus >= 1 else 0.0
        )
    ]


class RendererActor(Renderer):
    """The Renderer as Ray starts it. Ray names an actor class by disassembling the methods the
    class itself defines (~0.2 s of the controller's CPU for Renderer's, at the first start): this
    one defines none."""


@functools.cache
def _remote_renderer() -> Any:
    """The Ray actor class, made once a process: Ray exports each one it is given."""
    import ray

    return ray.remote(RendererActor)


def start_renderer(model: ModelRef, capacity: PoolCapacity):
    """Start one Renderer actor in a pool. Returns the actor handle at once; its ``info()``
    resolves once the model is resident."""

    resources = {} if capacity.pool.name == LOCAL_POOL else {f"{POOL_RESOURCE}{capacity.pool.name}": 1}
    threads = 2 if capacity.gpus_per_slot else CPUS_PER_CPU_RENDERER
    return (
        _remote_renderer()
        .options(
            num_cpus=0 if capacity.gpus_per_slot else CPUS_PER_CPU_RENDERER,
            num_gpus=capacity.gpus_per_slot,
            resources=resources,
            max_restarts=0,
            max_task_retries=0,
            # A GPU renderer generates the next clip while the last is encoded and uploaded.
            max_concurrency=RENDER_PIPELINE_DEPTH if capacity.gpus_per_slot else 1,
        )
        .remote(model, None, threads, capacity.pool.name)
    )
