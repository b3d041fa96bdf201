"""One embedded farm per local catalog: the first embedded ``farm submit`` owns it, later ones join.

Without ``--address`` farm starts a Ray for the submitting process, and Ray started by a driver
dies with it. Two such submits on one catalog used to start two farms that rendered every task
twice. Now the catalog folder holds:

    .embedded.lock             flock'ed by the owner for as long as its farm runs (the kernel
                               releases it when the owner dies, even on kill -9: never stale)
    .embedded.followers.lock   flock'ed shared by every submit that joined the farm
    .embedded.json             the farm: owner pid, user, host, Ray address and session, state
    .embedded.jobs/            jobs handed to the farm: <job>.handed (a follower's request),
                               <job>.progress.json (the owner's answer), <job>.cancel (Ctrl-C)

Policy:
- the first submit takes ``.embedded.lock`` and owns the farm: it starts Ray and the controller,
  runs its own job, and serves jobs handed to it (``Host``). It stops the farm only when every job
  handed to it has ended and no follower is attached (it takes the followers lock exclusively, so
  none can attach while it stops);
- a later submit by the same user joins: it takes the followers lock shared, writes its job to the
  catalog and hands it over through ``.embedded.jobs/``, then follows the progress the owner
  writes, as ``--address --wait`` does. A follower never connects to the owner's Ray: a driver
  whose Ray dies is taken down with it, and a follower must outlive the owner;
- if the owner dies, the follower that next takes ``.embedded.lock`` takes over: it starts its
  own farm and resumes every job the dead one held (its admitted jobs, and the handed-over ones);
  other followers keep following, now the new owner's progress;
- refused with one line (exit 2), never joined: a farm of another user (its files say whose), and
  a catalog on a network filesystem, where these locks cannot be trusted. Several people share a
  farm through a cluster: ``ray start --head`` and ``farm submit --address``. Catalogs on S3 are
  not coordinated at all (no lock is reliable there): use ``--address`` when several people share
  one.

Everything here is files and locks, no Ray: the owner's calls to its controller come in through
``FarmCalls``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from farm import __version__
from farm.config import EMBEDDED_POLL_S
from farm.errors import ClusterError, FarmError
from farm.locks import FileLock, filesystem_type, is_network_filesystem
from farm.task import JobState

STATE_FILE = ".embedded.json"
LOCK_FILE = ".embedded.lock"
FOLLOWERS_LOCK_FILE = ".embedded.followers.lock"
JOBS_DIR = ".embedded.jobs"
SHARED_USE = "share a farm through a cluster instead: 'ray start --head' and farm submit --address"


class FarmState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Role(StrEnum):
    OWNER = "owner"
    FOLLOWER = "follower"


class OwnerGone(Exception):
    """The farm a follower followed stopped under it; this process now holds the catalog's lock."""


@dataclass(frozen=True)
class FarmInfo:
    """What ``.embedded.json`` says of a farm."""

    pid: int
    user: str
    uid: int
    host: str
    state: str
    address: str = ""
    session: str = ""
    started_at: str = ""
    farm_version: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} of user {self.user} on {self.host}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.write_text(json.dumps(data, default=str))
    os.replace(temp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_lockable(catalog_root: str | Path) -> None:
    """Refuse a catalog on a network filesystem: its locks cannot keep two farms apart."""
    kind = filesystem_type(catalog_root)
    if is_network_filesystem(kind):
        raise ClusterError(
            f"catalog {catalog_root} is on a network filesystem ({kind}), where file locks cannot keep two "
            "embedded farms from rendering the same tasks",
            field="FARM_CATALOG",
            hint=f"keep the catalog on a local disk (FARM_HOME / FARM_CATALOG), or {SHARED_USE}",
        )


class Membership:
    """This process's place in a local catalog's embedded farm (see the module's policy)."""

    def __init__(self, catalog_root: str | Path) -> None:
        self.root = Path(catalog_root)
        self.main = FileLock(self.root / LOCK_FILE)
        self.followers = FileLock(self.root / FOLLOWERS_LOCK_FILE, shared=True)
        self.jobs_dir = self.root / JOBS_DIR
        self.state_file = self.root / STATE_FILE
        self.role: Role | None = None
        self.farm: FarmInfo | None = None  # the farm this process follows (or followed, until it died)
        self.previous: FarmInfo | None = None  # as owner: the farm the catalog had before, if it did not stop
        self._address = self._session = ""
        self._stopping: FileLock | None = None  # the followers lock, exclusive, while the owner stops

    # ------------------------------------------------------------------ joining
    def read_farm(self) -> FarmInfo | None:
        data = _read_json(self.state_file)
        if data is None:
            return None
        try:
            return FarmInfo(**{k: data[k] for k in FarmInfo.__dataclass_fields__ if k in data})
        except TypeError:
            return None

    def claim(self, wait_s: float, on_wait: Callable[[FarmInfo | None], None] | None = None) -> Role:
        """Own the catalog's farm (its lock was free, or its owner died) or join the running one.
        Waits up to ``wait_s`` for a farm that is starting or stopping. Raises FarmError for a farm
        of another user, or a catalog on a network filesystem."""
        self.root.mkdir(parents=True, exist_ok=True)
        check_lockable(self.root)
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            if self.main.held or self.main.acquire():
                return self._become_owner()
            farm = self.read_farm()
            if farm is not None and farm.uid != os.getuid() and _pid_alive(farm.pid):
                raise ClusterError(
                    f"catalog {self.root} is in use by the embedded farm of {farm.describe()}",
                    field="FARM_HOME",
                    hint=f"use a FARM_HOME (or FARM_CATALOG) of your own, or {SHARED_USE}",
                )
            running = farm is not None and farm.state == FarmState.RUNNING and _pid_alive(farm.pid)
            if running and self.followers.acquire():  # shared; refused only while the owner is stopping
                again = self.read_farm()
                if again is not None and farm is not None and again.pid == farm.pid and again.state == "running":
                    self.role, self.farm = Role.FOLLOWER, farm
                    return Role.FOLLOWER
                self.followers.release()
            if time.monotonic() > deadline:
                who = farm.describe() if farm else "another process"
                raise ClusterError(
                    f"the embedded farm of {who} on catalog {self.root} did not come up within {wait_s:g} s",
                    hint="try again, or stop that farm submit (Ctrl-C); FARM_EMBEDDED_JOIN_WAIT_S sets the wait",
                )
            if on_wait and not told:
                on_wait(farm)
                told = True
            time.sleep(EMBEDDED_POLL_S)

    def _become_owner(self) -> Role:
        self.followers.release()  # an owner is no follower (it may have been one, until the owner died)
        farm = self.read_farm()
        self.previous = farm if farm is not None and farm.state != FarmState.STOPPED else None
        self.role = Role.OWNER
        self._write_state(FarmState.STARTING)
        return Role.OWNER

    def _write_state(self, state: FarmState, address: str = "", session: str = "") -> None:
        info = FarmInfo(
            os.getpid(),
            getpass.getuser(),
            os.getuid(),
            socket.gethostname(),
            state.value,
            address,
            session,
            datetime.now(UTC).isoformat(timespec="seconds"),
            __version__,
        )
        _atomic_write(self.state_file, asdict(info))

    # ------------------------------------------------------------------ owner
    def publish(self, address: str, session: str) -> None:
        """The farm is up: followers may join (it serves ``.embedded.jobs/`` from now on)."""
        self.jobs_dir.mkdir(exist_ok=True)
        self._address, self._session = address, session
        self._write_state(FarmState.RUNNING, address, session)

    def handed_jobs(self) -> list[str]:
        try:
            return sorted(p.name[: -len(".handed")] for p in self.jobs_dir.glob("*.handed"))
        except OSError:
            return []

    def cancel_requested(self, job_id: str) -> bool:
        return (self.jobs_dir / f"{job_id}.cancel").exists()

    def write_progress(self, job_id: str, data: dict[str, Any]) -> None:
        _atomic_write(self.jobs_dir / f"{job_id}.progress.json", data)

    def begin_stop(self) -> bool:
        """Stop taking followers: True once none is attached (and none can attach); False while one is."""
        if self._stopping is None:
            exclusive = FileLock(self.root / FOLLOWERS_LOCK_FILE)
            if not exclusive.acquire():
                return False
            self._stopping = exclusive
            self._write_state(FarmState.STOPPING, self._address, self._session)
        return True

    def end_stop(self) -> None:
        """The farm is down: handed-over jobs left behind belong to followers that died; forget them."""
        with contextlib.suppress(OSError):
            for path in self.jobs_dir.iterdir():
                path.unlink()
        self._write_state(FarmState.STOPPED)
        if self._stopping is not None:
            self._stopping.release()
            self._stopping = None

    # ------------------------------------------------------------------ follower
    def hand(self, job_id: str) -> None:
        """Ask the owner to run a job already written to the catalog."""
        _atomic_write(self.jobs_dir / f"{job_id}.handed", {"pid": os.getpid(), "at": time.time()})

    def request_cancel(self, job_id: str) -> None:
        with contextlib.suppress(OSError):
            _atomic_write(self.jobs_dir / f"{job_id}.cancel", {"pid": os.getpid()})

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return _read_json(self.jobs_dir / f"{job_id}.progress.json")

    def owner_alive(self) -> bool:
        """False once the owner has died, and from then on this process holds the catalog's lock."""
        return not self.main.acquire()

    def detach(self, job_id: str) -> None:
        for suffix in (".handed", ".progress.json", ".cancel"):
            with contextlib.suppress(OSError):
                (self.jobs_dir / f"{job_id}{suffix}").unlink()

    def close(self) -> None:
        self.followers.release()
        self.main.release()


def is_final(state: str) -> bool:
    return state not in (JobState.RUNNING, JobState.CANCELLING, JobState.SUBMITTED)


class FarmCalls(Protocol):
    """What the owner's host needs from its controller (and catalog), as plain calls."""

    def submit(self, job_id: str) -> Any: ...  # admit a job written to the catalog; its JobProgress

    def run_to_end(self, job_id: str, progress: Any, on_progress: Callable[[Any], None]) -> Any: ...

    def cancel(self, job_id: str) -> Any: ...

    def renderer_stats(self) -> list[dict]: ...


class Host:
    """The owner's service to followers: admits each handed job, writes its progress to its file
    until it ends, and passes cancel requests on. One thread per job; ``busy`` while any runs."""

    def __init__(self, membership: Membership, calls: FarmCalls, skip: set[str]) -> None:
        self.membership = membership
        self.calls = calls
        self.served: dict[str, threading.Thread] = {}
        self.skip = set(skip)  # the owner's own job, followed by the owner itself
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-embedded-host", daemon=True)

    def start(self) -> Host:
        self._thread.start()
        return self

    def busy(self) -> bool:
        return any(t.is_alive() for t in self.served.values()) or bool(self._unserved())

    def _unserved(self) -> list[str]:
        return [j for j in self.membership.handed_jobs() if j not in self.served and j not in self.skip]

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            for job_id in self._unserved():
                thread = threading.Thread(target=self._serve, args=(job_id,), name=f"farm-serve-{job_id}", daemon=True)
                self.served[job_id] = thread
                thread.start()
            self._stop.wait(EMBEDDED_POLL_S)

    def _serve(self, job_id: str) -> None:
        write = self.membership.write_progress
        cancelled = False

        def on_progress(progress: Any) -> None:
            nonlocal cancelled
            write(job_id, {"progress": asdict(progress)})
            if not cancelled and self.membership.cancel_requested(job_id):
                cancelled = True
                self.calls.cancel(job_id)

        try:
            progress = self.calls.submit(job_id)
            progress = self.calls.run_to_end(job_id, progress, on_progress)
            write(job_id, {"progress": asdict(progress), "renderers": self.calls.renderer_stats(), "final": True})
        except FarmError as exc:  # e.g. the job's task list is damaged: the follower says so in one line
            write(job_id, {"error": str(exc), "exit_code": exc.exit_code, "final": True})
        except Exception as exc:  # the follower must not wait forever on a job the owner could not run
            write(job_id, {"error": f"the embedded farm could not run job {job_id}: {exc!r}", "final": True})
