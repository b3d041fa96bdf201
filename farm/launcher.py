"""`farm cluster up|down|status`: Ray's cluster launcher (`ray up`, `ray down`, `ray exec`) on a
cluster.yaml, after the checks that turn the launcher's tracebacks into one-line errors.

Before anything is launched the config must pass Ray's own validation, offer at least one farm
pool, and run every node with token authentication; the token file the nodes share is created
(256 random bits, mode 0600) if it does not exist yet. The launcher's own output is shown as it
runs and kept in a log under $FARM_HOME/launcher; when it fails, its last line is the error.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from farm.cluster import NodeType, node_types_of
from farm.config import farm_home
from farm.errors import ClusterError

# Where the start commands read the token from (cluster.yaml sets it; Ray's own default otherwise).
_TOKEN_PATH_RE = re.compile(r"RAY_AUTH_TOKEN_PATH=([^\s;'\"]+)")
_TOKEN_MODE_RE = re.compile(r"RAY_AUTH_MODE=token\b")
_ANY_MODE_RE = re.compile(r"RAY_AUTH_MODE=(\S*)")
_RAY_DEFAULT_TOKEN = "~/.ray/auth_token"


@dataclass(frozen=True)
class LauncherConfig:
    """A cluster.yaml that passed every check: what `ray up` will build from it."""

    path: Path
    cluster_name: str
    provider: str
    head_node_type: str
    node_types: tuple[NodeType, ...]
    token_file: Path  # on this machine; file_mounts copies it to every node
    token_path_on_nodes: str


@dataclass(frozen=True)
class LauncherRun:
    """One run of the Ray launcher."""

    config: LauncherConfig
    command: tuple[str, ...]
    returncode: int
    log: str
    last_line: str


def _fail(path: Path, message: str, hint: str, field: str | None = None) -> ClusterError:
    return ClusterError(message, file=str(path), field=field, hint=hint)


def load_config(path: Path, farm_checks: bool = True) -> LauncherConfig:
    """Read and check a cluster-launcher config; every problem is one ClusterError line. Without
    ``farm_checks`` only Ray's own validation runs: enough to reach (or tear down) a cluster that
    an edited config would no longer be allowed to create."""
    raw = _read_yaml(path)
    _validate_with_ray(path, raw)
    if not isinstance(raw.get("file_mounts") or {}, dict):
        raise _fail(
            path,
            "file_mounts must be a mapping of node path: local path",
            field="file_mounts",
            hint="write it as in the repository's cluster.yaml",
        )
    try:
        types = tuple(node_types_of(raw))
    except ClusterError as exc:
        raise _fail(path, exc.message, field=exc.field, hint=exc.hint or "") from None
    commands = [str(c) for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw.get(key) or []]
    token_paths = {m.group(1) for c in commands for m in _TOKEN_PATH_RE.finditer(c)}
    on_nodes = sorted(token_paths)[0] if token_paths else _RAY_DEFAULT_TOKEN
    config = LauncherConfig(
        path=path,
        cluster_name=str(raw.get("cluster_name", "default")),
        provider=str((raw.get("provider") or {}).get("type", "")),
        head_node_type=str(raw.get("head_node_type", "")),
        node_types=types,
        token_file=Path(on_nodes.replace("$HOME", "~")).expanduser(),
        token_path_on_nodes=on_nodes,
    )
    if not farm_checks:
        return config
    _check_farm_rules(path, raw, types, token_paths)
    return replace(config, token_file=_local_token_file(path, raw, on_nodes))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise _fail(path, "no such cluster config", "give the path of a cluster.yaml (the repository has one)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ClusterError(
            f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
            file=str(path),
            line=line,
            hint="fix the YAML syntax",
        ) from None
    if not isinstance(raw, dict):
        raise _fail(path, "a cluster config is a YAML mapping", "start from the repository's cluster.yaml")
    return raw


def _check_farm_rules(path: Path, raw: dict[str, Any], types: tuple[NodeType, ...], token_paths: set[str]) -> None:
    """What farm asks beyond Ray's schema: a farm pool on a worker type, token auth in every start
    command, one token file for every node."""
    if not types:
        raise _fail(
            path,
            "no worker node type offers a farm pool",
            field="available_node_types",
            hint='add a resource "farm_pool:<name>": <renderer slots> to a worker type\'s resources',
        )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [str(c) for c in raw.get(key) or [] if "ray start" in str(c)]
        other_modes = {m.group(1) for c in raw.get(key) or [] for m in _ANY_MODE_RE.finditer(str(c))} - {"token"}
        # The setting must be in the command that starts Ray (a comment or an echo elsewhere does not count).
        if not starts or other_modes or not all(_TOKEN_MODE_RE.search(c.split("ray start")[0]) for c in starts):
            raise _fail(
                path,
                "starts Ray without token authentication: anyone who reaches its ports could run "
                "code on the cluster (CVE-2023-48022)",
                field=key,
                hint="export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<file> in the same command, before "
                "'ray start', as the repository's cluster.yaml does",
            )
    if len(token_paths) > 1:
        raise _fail(
            path,
            f"the start commands read the token from different files: {sorted(token_paths)}",
            field="head_start_ray_commands",
            hint="every node must read the same RAY_AUTH_TOKEN_PATH",
        )


def _validate_with_ray(path: Path, raw: dict) -> None:
    """Ray's own schema and defaults, exactly what `ray up` checks first."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except jsonschema.ValidationError as exc:
        field = ".".join(str(p) for p in exc.absolute_path) or None
        raise _fail(
            path,
            f"Ray's cluster schema rejects it: {exc.message}",
            field=field,
            hint="see Ray's cluster YAML reference, or compare with the repository's cluster.yaml",
        ) from None
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        NotImplementedError,
        AssertionError,
    ) as exc:  # what Ray's own checks raise on configs its schema lets through
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(
            path, f"Ray's cluster launcher rejects it: {detail}", hint="compare with the repository's cluster.yaml"
        ) from None


def _local_token_file(path: Path, raw: dict, on_nodes: str) -> Path:
    """The file on this machine that file_mounts copies to ``on_nodes`` on every node."""
    node_path = on_nodes.replace("$HOME", "~")
    for remote, local in (raw.get("file_mounts") or {}).items():
        remote = str(remote).rstrip("/")
        if node_path == remote:
            return Path(str(local)).expanduser()
        if node_path.startswith(remote + "/"):
            return Path(str(local)).expanduser() / node_path[len(remote) + 1 :]
    raise _fail(
        path,
        f"the nodes read the Ray token from {on_nodes}, but no file_mounts entry puts it there",
        field="file_mounts",
        hint=f"mount the directory of {on_nodes} from this machine, as the repository's cluster.yaml does",
    )


def ensure_token(config: LauncherConfig) -> bool:
    """Create the cluster's token file if it is missing; True when it was created."""
    if config.token_file.is_file() and config.token_file.read_text().strip():
        if config.token_file.stat().st_mode & 0o077:  # file_mounts copies the mode to every node
            config.token_file.chmod(0o600)
        return False
    config.token_file.parent.mkdir(parents=True, exist_ok=True)
    # 256 bits, the same form as `ray get-auth-token --generate`; readable by its owner only.
    fd = os.open(config.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return True


def _check_credentials(config: LauncherConfig) -> None:
    """The clouds' SDKs raise a traceback without credentials; say it in one line instead."""
    if config.provider != "aws":
        return
    import boto3
    import botocore.exceptions

    try:
        credentials = boto3.Session().get_credentials()
    except botocore.exceptions.BotoCoreError as exc:  # e.g. an AWS_PROFILE that does not exist
        raise ClusterError(
            f"cannot read AWS credentials: {exc}",
            file=str(config.path),
            field="provider",
            hint="fix AWS_PROFILE or ~/.aws/config, or run 'aws configure'",
        ) from None
    if credentials is None:
        raise ClusterError(
            "no AWS credentials found for the cluster launcher",
            file=str(config.path),
            field="provider",
            hint="run 'aws configure', or set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )


def _ray_executable() -> str:
    # The ray next to this Python first: the launcher must be the same Ray as the cluster's.
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the 'ray' command is not installed", hint="install farm into this environment again")
    return found


def _run(config: LauncherConfig, verb: str, args: list[str], echo: TextIO) -> LauncherRun:
    """Run the launcher, echoing its output live but holding back a Python traceback (kept in
    the log): a failure ends in one line, not a screen of Ray's internals."""
    log_dir = farm_home() / "launcher"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{config.cluster_name}-{verb}.log"
    command = (_ray_executable(), *args)
    in_traceback = False
    last_line = ""
    with open(log, "w") as log_file:
        try:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            raise ClusterError(f"cannot run the Ray launcher: {exc}", hint="install farm again") from None
        try:
            for line in proc.stdout or ():
                log_file.write(line)
                log_file.flush()
                if line.startswith("Traceback (most recent call last)"):
                    in_traceback = True
                elif (
                    in_traceback
                    and line[:1] not in (" ", "\t", "\n", "")
                    and not line.startswith(("During handling", "The above exception"))
                ):
                    in_traceback = False  # the exception's own line closes the traceback: kept as last_line
                    last_line = line.strip()
                    continue
                if not in_traceback:
                    echo.write(line)
                if line.strip():
                    last_line = line.strip()
        finally:
            returncode = proc.wait()
    return LauncherRun(config, command, returncode, str(log), last_line)


def _checked(config: LauncherConfig, verb: str, run: LauncherRun) -> LauncherRun:
    if run.returncode != 0:
        raise ClusterError(
            f"'ray {verb}' failed (exit {run.returncode}): {run.last_line or 'no output'}",
            file=str(config.path),
            hint=f"the launcher's full output is in {run.log}",
        )
    return run


def up(path: Path, *, restart: bool = True, echo: TextIO = sys.stderr) -> LauncherRun:
    """Create or update the cluster: `ray up`, non-interactively."""
    config = load_config(path)
    if ensure_token(config):
        echo.write(f"created the cluster's Ray token at {config.token_file} (mode 0600); clients need it too\n")
    _check_credentials(config)
    args = ["up", "--yes", str(path)] + ([] if restart else ["--no-restart"])
    return _checked(config, "up", _run(config, "up", args, echo))


def down(path: Path, *, echo: TextIO = sys.stderr) -> LauncherRun:
    """Terminate every node of the cluster: `ray down`. Ray's checks only: a config edited since
    `up` must still be able to stop the nodes that bill."""
    config = load_config(path, farm_checks=False)
    _check_credentials(config)
    return _checked(config, "down", _run(config, "down", ["down", "--yes", str(path)], echo))


def status(path: Path, *, echo: TextIO = sys.stderr) -> LauncherRun:
    """Ray's view of the cluster (nodes, resources, pending demands), asked on the head node."""
    config = load_config(path, farm_checks=False)
    _check_credentials(config)
    on_head = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={config.token_path_on_nodes} ray status"
    return _checked(config, "exec", _run(config, "status", ["exec", str(path), on_head], echo))
