"""Connect to Ray (or start an embedded one), decide renderer slots, start renderer actors."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from farm.config import CPUS_PER_CPU_RENDERER, RAY_CONNECT_TIMEOUT_S
from farm.errors import ClusterError, ModelError
from farm.render import Renderer, RendererInfo, TestFaults
from farm.task import ModelRef


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    embedded: bool  # started by farm for this process; shut down when it is done
    nodes: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class SlotSpec:
    """One renderer's reservation: a GPU each where there are GPUs, else CPU cores."""

    name: str
    num_cpus: float
    num_gpus: float
    threads: int


@dataclass
class RendererHandle:
    slot: SlotSpec
    actor: object  # a Ray ActorHandle of Renderer
    info: RendererInfo


def connect(address: str | None = None, num_cpus: int | None = None) -> ClusterInfo:
    """Join the Ray cluster at ``address``, or start an embedded local one."""
    import ray

    embedded = False
    if not ray.is_initialized():
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address:
            _check_reachable(address)
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
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **quiet)
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
        raise ClusterError(f"--address {address!r} is not HOST:PORT", field="--address",
                           hint="give the head node's GCS address, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray head at {address} ({exc.strerror or exc})",
            field="--address",
            hint="start one with 'ray start --head', check the address and firewall, or omit --address "
            "to use an embedded local Ray",
        ) from None


def disconnect(info: ClusterInfo) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def plan_slots(info: ClusterInfo, workers: int | None = None) -> list[SlotSpec]:
    """One renderer per GPU; without GPUs, one per ``CPUS_PER_CPU_RENDERER`` cores."""
    if info.gpus >= 1:
        count = int(info.gpus) if workers is None else min(workers, int(info.gpus))
        return [SlotSpec(f"gpu-{i}", 1, 1, 2) for i in range(count)]
    available = max(1, int(info.cpus // CPUS_PER_CPU_RENDERER))
    count = available if workers is None else workers
    if count < 1:
        raise ClusterError(f"--workers {count}: need at least one renderer", field="--workers", hint="use 1 or more")
    return [SlotSpec(f"cpu-{i}", CPUS_PER_CPU_RENDERER, 0, CPUS_PER_CPU_RENDERER) for i in range(count)]


def start_renderers(
    model: ModelRef, slots: list[SlotSpec], test_faults: TestFaults | None = None
) -> list[RendererHandle]:
    """Start one Renderer actor per slot and wait until each has its model resident."""
    import ray

    remote_renderer = ray.remote(Renderer)
    actors = [
        remote_renderer.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=0, max_task_retries=0)
        .remote(model, None, s.threads, test_faults)
        for s in slots
    ]
    infos = ray.get([a.info.remote() for a in actors])
    failed = [i for i in infos if i.load_error]
    if failed:
        for actor in actors:
            ray.kill(actor)
        raise ModelError(f"model {model.spec!r} did not load: {failed[0].load_error}", field="model")
    return [RendererHandle(s, a, i) for s, a, i in zip(slots, actors, infos, strict=True)]


def stop_renderers(handles: list[RendererHandle]) -> None:
    import ray

    for handle in handles:
        ray.kill(handle.actor)
