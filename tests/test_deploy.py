"""Deployment files: cluster.yaml (Ray cluster launcher), deploy/docker/Dockerfile and
deploy/kuberay/raycluster.yaml. Checked offline with Ray's own config code, and against each other
and farm/cluster.py, so the pools they advertise cannot drift apart."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from farm.cluster import COST_RESOURCE, GPU_TYPE_RESOURCE, POOL_RESOURCE, VRAM_RESOURCE, discover_pools

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
RAYCLUSTER = ROOT / "deploy" / "kuberay" / "raycluster.yaml"

# pool -> (GPU type, VRAM GB, $ per slot-hour, renderer slots per node)
EXPECTED_POOLS = {
    "gpu24": ("A10G", 24, 1.01, 1),
    "l4": ("L4", 24, 0.80, 1),
    "a100_80": ("A100", 80, 5.12, 8),
}
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where Ray >= 2.52 reads the token from


def _pools(resources_by_node: dict[str, dict]) -> dict[str, tuple]:
    nodes = [{"Alive": True, "NodeID": name, "Resources": res} for name, res in resources_by_node.items()]
    return {
        c.pool.name: (c.pool.gpu_type, c.pool.vram_gb, c.pool.cost_per_hour, c.slots) for c in discover_pools(nodes)
    }


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return yaml.safe_load(RAYCLUSTER.read_text())


def _workers(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


# --- cluster.yaml ---------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation(cluster):
    """What `ray up` does before it touches a cloud (commands._bootstrap_config): fill in the AWS
    defaults, then validate against ray/autoscaler/ray-schema.json and the node-type rules."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Empty setup commands replace Ray's AWS defaults (which would pip install a Ray nightly).
    assert prepared["setup_commands"] == prepared["head_setup_commands"] == prepared["worker_setup_commands"] == []

    broken = copy.deepcopy(cluster)  # the validator is really engaged: Ray takes whole resources only
    broken["available_node_types"]["l4"]["resources"][COST_RESOURCE] = 80.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_worker_types_are_the_farm_pools(cluster):
    workers = _workers(cluster)
    assert set(workers) == set(EXPECTED_POOLS)
    for name, node_type in workers.items():
        res = node_type["resources"]
        assert [k for k in res if k.startswith(POOL_RESOURCE)] == [f"{POOL_RESOURCE}{name}"]
        assert len([k for k in res if k.startswith(GPU_TYPE_RESOURCE)]) == 1
        assert VRAM_RESOURCE in res and COST_RESOURCE in res
        assert res[f"{POOL_RESOURCE}{name}"] == res["GPU"]  # one renderer slot per GPU
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert _pools({n: t["resources"] for n, t in workers.items()}) == EXPECTED_POOLS
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert not any(k.startswith(POOL_RESOURCE) for k in head["resources"]) and head["resources"]["CPU"] == 0


def test_cluster_yaml_start_commands_are_secure(cluster):
    mounts = [str(Path(remote)) for remote in cluster["file_mounts"]]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert len(starts) == 1, key
        env = dict(t.split("=", 1) for t in shlex.split(starts[0].replace(";", " ")) if re.match(r"^[A-Z_]+=", t))
        assert env["RAY_AUTH_MODE"] == "token", key
        # the token file comes from a file mount, on every node
        token_path = env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", "~")
        assert any(token_path.startswith(m + "/") for m in mounts), token_path
        assert "--metrics-export-port=8080" in starts[0]
        assert "0.0.0.0" not in " ".join(cluster[key])
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_cluster_yaml_documents_a_workstation_joining_as_its_own_pool():
    lines = [
        ln.lstrip("# ").strip()
        for ln in CLUSTER_YAML.read_text().splitlines()
        if ln.startswith("#") and "ray start --address" in ln
    ]
    assert len(lines) == 1
    tokens = shlex.split(lines[0])
    env = dict(t.split("=", 1) for t in tokens[: tokens.index("ray")])
    assert env["RAY_AUTH_MODE"] == "token" and set(env) & set(TOKEN_ENV)
    resources = json.loads(next(t for t in tokens if t.startswith("--resources="))[len("--resources=") :])
    assert _pools({"workstation": {**resources, "GPU": 1}}) == {"studio": ("RTX4090", 24, 0.0, 1)}


# --- Dockerfile -----------------------------------------------------------------------------

KNOWN_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "HEALTHCHECK",
    "SHELL",
    "STOPSIGNAL",
    "ONBUILD",
}


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(instructions) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip('"')
    return args


def test_dockerfile_builds_farm_on_the_clients_ray():
    instructions = _dockerfile()
    assert {w for w, _ in instructions} <= KNOWN_INSTRUCTIONS
    assert next(w for w, _ in instructions if w != "ARG") == "FROM"
    args = _arg_defaults(instructions)
    image = next(rest for w, rest in instructions if w == "FROM")
    for key, value in args.items():
        image = image.replace(f"${{{key}}}", value)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert match, image
    assert match[1] == ray.__version__  # the cluster's Ray must be the client's
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert Version(f"{match[2]}.{match[3]}") in Requirement(f"x{pyproject['project']['requires-python']}").specifier

    sources = {s for w, rest in instructions if w == "COPY" for s in rest.split()[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "farm"} <= sources and all((ROOT / s).exists() for s in sources), sources
    assert any(re.search(r"pip install (\S+ )*\.( |$)", rest) for w, rest in instructions if w == "RUN")
    assert not any(w == "ENTRYPOINT" for w, _ in instructions)  # launchers run `ray start` in it
    assert json.loads(next(rest for w, rest in instructions if w == "CMD"))[0] == "farm"


def test_dockerfile_turns_token_auth_on_with_cluster_yamls_token(cluster):
    env = dict(re.findall(r"(RAY_AUTH_\w+)=(\S+)", " ".join(rest for w, rest in _dockerfile() if w == "ENV")))
    assert env["RAY_AUTH_MODE"] == "token"
    start = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    on_nodes = set(re.findall(r"RAY_AUTH_TOKEN_PATH=([^\s;]+)", start))
    assert {p.replace("$HOME", "/home/ray") for p in on_nodes} == {env["RAY_AUTH_TOKEN_PATH"]}


def test_dockerfile_torch_is_within_pyprojects_range():
    torch_spec = Requirement(_arg_defaults(_dockerfile())["TORCH_SPEC"]).specifier
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    project_spec = next(Requirement(d) for d in deps if Requirement(d).name == "torch").specifier
    candidates = [Version(f"2.{minor}.{patch}") for minor in range(0, 20) for patch in range(4)]
    admitted = [v for v in candidates if v in torch_spec]
    assert Version("2.13.0") in admitted and all(v in project_spec for v in admitted)


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "farm-data"} <= set(ignored)


# --- KubeRay RayCluster -----------------------------------------------------------------------
# No RayCluster CRD schema ships in any package this project installs (KubeRay's CRDs live in its
# Go repository), so the structure is checked here field by field, and the CR is fed to the code
# Ray's autoscaler itself runs on KubeRay to read a RayCluster (which also validates the result).

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _containers(rc: dict) -> list[dict]:
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert DNS_LABEL.match(raycluster["metadata"]["name"])
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups) == len(EXPECTED_POOLS)
    for group in [head, *groups]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # the CRD's map[string]string
        assert group["rayStartParams"].get("metrics-export-port") == "8080"
        assert group["template"]["spec"]["containers"]
    for group in groups:
        assert DNS_LABEL.match(group["groupName"]), group["groupName"]  # it becomes part of pod names
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["nodeSelector"]
    for container in _containers(raycluster):
        assert DNS_LABEL.match(container["name"]) and container["image"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and set(requests) <= set(limits)


def test_raycluster_worker_groups_are_cluster_yamls_pools(raycluster, cluster):
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
        _get_custom_resources,
    )

    derived = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(raycluster))  # runs validate_config too
    for group in raycluster["spec"]["workerGroupSpecs"]:
        custom = _get_custom_resources({}, group["rayStartParams"], group["groupName"])
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert custom[next(k for k in custom if k.startswith(POOL_RESOURCE))] == gpus  # one renderer per GPU
    kuberay_pools = _pools({n: t["resources"] for n, t in derived["available_node_types"].items()})
    assert kuberay_pools == _pools({n: t["resources"] for n, t in _workers(cluster).items()}) == EXPECTED_POOLS


def test_raycluster_uses_token_auth_from_a_secret(raycluster):
    text = RAYCLUSTER.read_text()
    secret = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", text)
    assert secret, "the comment shows how to create the token Secret"
    envs = [c["env"] for c in _containers(raycluster)] + [raycluster["spec"]["autoscalerOptions"]["env"]]
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret[1], "key": secret[2]}


def test_every_deployment_runs_the_same_image(raycluster, cluster):
    assert {c["image"] for c in _containers(raycluster)} == {cluster["docker"]["image"]}
