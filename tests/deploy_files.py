"""Shared by the offline checks of the deployment files in docker/ and infra/ (the
``test_infra_*`` modules): where the files are and how to read them, the Kubernetes
validation, KubeRay's structural schema, the Prefect work pool template's rendering, and
the parsers of the command lines the manifests hold (``ray start``, ``mlflow server``,
``prefect``).
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import latest_version

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
NAMESPACE = "transfusion"

# The oldest Kubernetes infra/README.md supports, and the newest the schemas know.
K8S_VERSIONS = ("1.31", latest_version())
# Helm values and the kustomization are YAML but not Kubernetes objects.
NOT_K8S_OBJECTS = {"kustomization.yaml", "prefect-worker-values.yaml", "prefect-server-values.yaml"}
PLACEHOLDER = "CHANGE_ME"


def yaml_files() -> list[Path]:
    found = [*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml"), *INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]
    return sorted(set(found))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[tuple[str, dict]]:
    """(label, object) for every Kubernetes object in infra/k8s/*.yaml."""
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_K8S_OBJECTS:
            continue
        for index, doc in enumerate(documents(path)):
            objects.append((f"{path.name}[{index}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return objects


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_objects() if doc.get("kind") == kind]


def one(kind: str) -> dict:
    (doc,) = by_kind(kind)
    return doc


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_config_maps() -> dict[str, dict[str, str]]:
    """The literals of each ConfigMap kustomization.yaml generates."""
    result = {}
    for generator in kustomization()["configMapGenerator"]:
        literals = dict(item.split("=", 1) for item in generator.get("literals", []))
        files_ = dict(item.split("=", 1) for item in generator.get("files", []))
        result[generator["name"]] = {**literals, **dict.fromkeys(files_)}
    return result


def example_secrets() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["stringData"] for doc in documents(K8S / "secrets.example.yaml")}


def constraint(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise LookupError(f"{package} is not pinned in constraints.txt")


def tool(name: str) -> str | None:
    """A command-line tool from this virtual environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def validate_k8s(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def as_pod_template(template: dict, name: str) -> dict:
    """A pod template embedded in a custom resource, as a PodTemplate the schemas know."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def containers_of(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# ---------------------------------------------------------------------- KubeRay

# Written from KubeRay's ray.io/v1 Go types (raycluster_types.go, rayjob_types.go). Every
# level lists its fields, so a misspelt field fails here instead of being pruned by the
# API server; pod templates are checked separately against Kubernetes' PodTemplate schema.
_OBJECT = {"type": "object"}
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}
_HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "template": _POD_TEMPLATE,
        "headService": _OBJECT,
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _RAY_START_PARAMS,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": _RAY_START_PARAMS,
        "template": _POD_TEMPLATE,
        "scaleStrategy": _OBJECT,
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
}
_AUTOSCALER_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "resources": _OBJECT,
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": _OBJECT,
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
    },
}
RAY_CLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headServiceAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": _OBJECT,
        "headGroupSpec": _HEAD_GROUP,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
RAY_CLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": _METADATA,
        "spec": RAY_CLUSTER_SPEC_SCHEMA,
    },
}
RAY_JOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": RAY_CLUSTER_SPEC_SCHEMA,
                "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "submitterConfig": _OBJECT,
                "managedBy": {"type": "string"},
                "deletionStrategy": _OBJECT,
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
                "schedule": {"type": "string"},
            },
        },
    },
}


def gpu_limit(container: dict) -> int:
    return int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict) -> None:
    """A RayCluster spec (also a RayJob's rayClusterSpec) as transfusion needs it."""
    jsonschema.validate(spec, RAY_CLUSTER_SPEC_SCHEMA)
    assert spec["rayVersion"] == constraint("ray"), "rayVersion must be the Ray of constraints.txt"
    assert spec.get("enableInTreeAutoscaling") is True

    head = spec["headGroupSpec"]
    validate_k8s(as_pod_template(head["template"], "head"))
    assert head["rayStartParams"].get("num-cpus") == "0", "nothing may be scheduled on the head"
    (head_container,) = containers_of(head["template"])
    assert "transfusion-cpu" in head_container["image"]
    assert gpu_limit(head_container) == 0

    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(gpu_limit(c) for c in containers_of(g["template"]))]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in spec["workerGroupSpecs"]:
        validate_k8s(as_pod_template(group["template"], group["groupName"]))
        assert group["minReplicas"] == 0, "workers scale from zero"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
    for group in gpu_groups:
        pod = group["template"]["spec"]
        for container in containers_of(group["template"]):
            assert "transfusion-cuda" in container["image"]
            requests = container["resources"].get("requests", {})
            # Extended resources such as GPUs cannot be overcommitted: request == limit.
            assert str(requests.get("nvidia.com/gpu")) == str(gpu_limit(container))
        assert pod.get("nodeSelector"), "GPU workers must be pinned to the GPU node pool"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
            "no toleration of the GPU taint"
        )
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), "worker group names must be unique"


def rayjob() -> dict:
    (job,) = documents(K8S / "rayjob.yaml")
    return job


def parse_ray_start(args: list[str]) -> None:
    """Parses ``ray start`` arguments with Ray's own command, without running it."""
    from ray.scripts.scripts import start

    start.make_context("ray start", list(args))


def parse_mlflow_server(args: list[str]) -> None:
    from mlflow.cli import server

    server.make_context("mlflow server", list(args))


def parse_prefect(args: list[str]) -> None:
    """Parses a ``prefect`` command line with Prefect's cyclopts app, without running it."""
    try:
        import prefect.cli.server  # noqa: F401  (registers `prefect server`)
        from prefect.cli._app import _app as prefect_app
    except ImportError as exc:  # a private name: Prefect may move it
        pytest.skip(f"cannot reach Prefect's CLI parser: {exc}")
    prefect_app.parse_args(list(args), exit_on_error=False, print_error=False)


# ------------------------------------------------------------- Prefect work pool template


def base_job_template() -> dict:
    return json.loads((K8S / "prefect-base-job-template.json").read_text())


def render_flow_run_job(template: dict, values: dict) -> dict:
    """The Job a Kubernetes worker would create from ``template`` for one flow run.

    Applies the variables' defaults and ``values`` with Prefect's own templating, then does
    what prefect-kubernetes' worker does before it submits the manifest: the ``env`` mapping
    becomes a list of name/value pairs, the command string becomes the container's args, and
    the flow run's name fills ``generateName``.
    """
    from prefect.utilities.templating import apply_values

    variables = {
        name: schema["default"]
        for name, schema in template["variables"]["properties"].items()
        if schema.get("default") is not None
    }
    variables.update(values)
    config = apply_values(copy.deepcopy(template["job_configuration"]), variables)
    manifest = config["job_manifest"]
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    container["env"] = [{"name": k, "value": str(v)} for k, v in (container.get("env") or {}).items()]
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return manifest


def parse_dockerfile(path: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=path.open("rb"))
    return parser
