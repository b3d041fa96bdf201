"""A real multi-process Ray cluster on this machine, started the way an operator starts one:
`ray start --head` and `ray start --address` per worker node, token authentication on.

Each node's processes carry a marker in their environment, so one node can be killed (as a
machine crash would) and the whole cluster stopped without touching any other Ray on the machine
(`ray stop` would stop them all)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
_MARKER = "FARM_TEST_RAY_CLUSTER"
_NODE = "FARM_TEST_RAY_NODE"


class RayCliCluster:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.cluster_id = uuid.uuid4().hex[:12]
        self.token = secrets.token_hex(32)
        # Ray's socket paths must stay short: not under pytest's deep tmp folders.
        self.temp_dir = tempfile.mkdtemp(prefix="farm-ray-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            _MARKER: self.cluster_id,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.workers: dict[str, tuple[dict, int]] = {}

    def client_env(self, **extra: str) -> dict[str, str]:
        """What a client with the cluster's token needs (no cluster marker: not one of its nodes)."""
        env = {k: v for k, v in self.env.items() if k not in (_MARKER, _NODE)}
        env.update(extra)
        return env

    def start_head(self, *extra: str) -> None:
        self._ray_start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                f"--temp-dir={self.temp_dir}",
                "--dashboard-host=127.0.0.1",
                *extra,
            ],
        )

    def add_worker(self, name: str, resources: dict, num_cpus: int) -> None:
        self.workers[name] = (resources, num_cpus)
        self._ray_start(
            name, [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"]
        )

    def restart_worker(self, name: str) -> None:
        resources, num_cpus = self.workers[name]
        self.add_worker(name, resources, num_cpus)

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of one node (its raylet, agents and workers): a machine lost."""
        pids = _with_descendants(_pids_with(f"{_MARKER}={self.cluster_id}", f"{_NODE}={name}"))
        for pid in pids:
            _kill(pid)
        return len(pids)

    def stop(self) -> None:
        for _ in range(3):  # processes may spawn children while the first ones die
            pids = _with_descendants(_pids_with(f"{_MARKER}={self.cluster_id}"))
            if not pids:
                break
            for pid in pids:
                _kill(pid)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _ray_start(self, node: str, args: list[str]) -> None:
        result = subprocess.run(
            [RAY, "start", "--disable-usage-stats", *args],
            env={**self.env, _NODE: node},
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ray start ({node}) failed:\n{result.stdout}\n{result.stderr}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(*entries: str) -> list[int]:
    wanted = {e.encode() for e in entries}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            pids.append(int(proc.name))
    return pids


def _with_descendants(pids: list[int]) -> set[int]:
    """The processes and all their descendants. Ray's workers and agents rename themselves
    (ray::Renderer), which overwrites what /proc shows of their environment: they are found as
    children of the node's raylet instead."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
