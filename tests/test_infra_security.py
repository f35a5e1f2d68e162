"""The deployment's control planes are closed: every one asks for a credential, each
workload has its own identity, only the namespace reaches Ray, and placeholders never run.

Offline, like the other tests/test_infra_*.py, whose loaders and schema checks these reuse.
"""

from __future__ import annotations

import configparser
import copy
import re

import pytest

from tests.deploy_files import (
    COMPOSE,
    DOCKER,
    K8S,
    PLACEHOLDER,
    base_job_template,
    by_kind,
    containers_of,
    example_secrets,
    generated_config_maps,
    kustomization,
    one,
    rayjob,
    render_flow_run_job,
    validate_k8s,
)
from tests.test_infra_compose import REQUIRED_REF, compose, env_example
from tests.test_infra_docker import fake_ray, ray_calls, run_entrypoint  # noqa: F401  (fake_ray: a fixture)
from tests.test_infra_k8s import all_manifests, container_env, references

RAY_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
ARTIFACT_BUCKET = "transfusion-artifacts"
KUBERAY_NAMESPACE = "kuberay-system"


def ray_specs() -> list[tuple[str, dict]]:
    return [("raycluster", one("RayCluster")["spec"]), ("rayjob", rayjob()["spec"]["rayClusterSpec"])]


def flow_run_job() -> dict:
    return render_flow_run_job(base_job_template(), {"name": "x", "command": "prefect flow-run execute"})


def service_accounts() -> dict[str, dict]:
    return {sa["metadata"]["name"]: sa for sa in by_kind("ServiceAccount")}


def secret_names(obj) -> set[str]:
    """Every Secret a manifest (or pod spec) reads: env, envFrom and volumes."""
    named = {ref["name"] for ref in references(obj, "secretKeyRef") + references(obj, "secretRef")}
    return named | {volume["secretName"] for volume in references(obj, "secret") if "secretName" in volume}


# ------------------------------------------------------------------------------ Ray


@pytest.mark.parametrize(("label", "spec"), ray_specs(), ids=[label for label, _ in ray_specs()])
def test_ray_clusters_demand_a_token_from_the_shared_secret(label, spec):
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{label}: Ray's control plane must demand a token"
    assert auth.get("secretName") == "transfusion-ray-auth", f"{label}: a token the flow-run pods can mount"
    assert "auth_token" in example_secrets()[auth["secretName"]], "KubeRay reads the key auth_token"


def test_flow_run_pods_present_the_clusters_token():
    """The driver pod mounts the RayCluster's token Secret where RAY_AUTH_TOKEN_PATH points."""
    pod = flow_run_job()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    assert env["RAY_AUTH_MODE"] == "token"
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == one("RayCluster")["spec"]["authOptions"]["secretName"]
    assert token_path.rsplit("/", 1)[1] == "auth_token", "the mounted file is the Secret's key"
    assert secret.get("defaultMode", 0o644) & 0o077 == 0, "the token file is readable by its owner only"
    validate_k8s(flow_run_job())


@pytest.mark.parametrize(("label", "spec"), ray_specs(), ids=[label for label, _ in ray_specs()])
def test_ray_dashboard_stays_on_the_pod_network(label, spec):
    """The dashboard may bind the pod's address (the operator and RayJob's submitter call it
    through the head Service) only behind the token, and the Service is never exposed."""
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: head Service exposed beyond the cluster"
    assert not head.get("enableIngress"), f"{label}: an Ingress would publish the dashboard"
    if head["rayStartParams"].get("dashboard-host", "127.0.0.1") not in ("127.0.0.1", "localhost"):
        assert spec["authOptions"]["mode"] == "token", f"{label}: dashboard on the pod network without auth"
    for container in containers_of(head["template"]):
        assert not [p for p in container.get("ports", []) if "hostPort" in p], f"{label}: a hostPort skips policies"


def policies_selecting(labels: dict[str, str]) -> list[dict]:
    """The NetworkPolicies whose podSelector matches a pod with these labels."""

    def matches(selector: dict) -> bool:
        if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
            return False
        for expression in selector.get("matchExpressions") or []:
            key, operator = expression["key"], expression["operator"]
            if operator == "Exists" and key not in labels:
                return False
            if operator == "In" and labels.get(key) not in expression["values"]:
                return False
            if operator in ("NotIn", "DoesNotExist"):
                raise NotImplementedError(operator)
        return True

    return [p for p in by_kind("NetworkPolicy") if matches(p["spec"]["podSelector"])]


def peers_allowed_on(policies: list[dict], port: int) -> list[dict]:
    """Every ``from`` peer of every ingress rule that lets traffic reach ``port``."""
    peers = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(int(p["port"]) == port for p in ports):
                continue
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without 'from' admits everyone"
            peers += rule["from"]
    return peers


# KubeRay's labels on a head pod (any cluster name: the RayJob's is generated).
HEAD_POD_LABELS = {"ray.io/node-type": "head", "ray.io/cluster": "transfusion-full-grid-x7k2p"}


def check_only_the_namespace_reaches(policies: list[dict], port: int) -> None:
    assert policies, "no NetworkPolicy selects the Ray head: every pod in the cluster reaches its ports"
    for peer in peers_allowed_on(policies, port):
        assert "ipBlock" not in peer, f"port {port} open to addresses outside the cluster"
        if "namespaceSelector" in peer:
            # Only the KubeRay operator, only on the dashboard.
            assert port == RAY_HEAD_PORTS["dashboard"], f"port {port} open to another namespace"
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": KUBERAY_NAMESPACE}}
        else:
            assert "podSelector" in peer, f"port {port}: a peer that is neither pods nor a namespace"


@pytest.mark.parametrize(("name", "port"), RAY_HEAD_PORTS.items())
def test_only_the_namespaces_pods_reach_the_ray_head(name, port):
    (head,) = containers_of(one("RayCluster")["spec"]["headGroupSpec"]["template"])
    assert {p["name"]: p["containerPort"] for p in head["ports"]}[name] == port
    check_only_the_namespace_reaches(policies_selecting(HEAD_POD_LABELS), port)


def test_network_policies_are_applied_with_the_rest():
    assert "networkpolicy.yaml" in kustomization()["resources"]
    for policy in by_kind("NetworkPolicy"):
        validate_k8s(policy)
    # MLflow and the Prefect server are closed to other namespaces as well.
    for name, port in (("mlflow", 5000), ("prefect-server", 4200)):
        peers = peers_allowed_on(policies_selecting({"app.kubernetes.io/name": name}), port)
        assert peers and all(set(peer) == {"podSelector"} for peer in peers), name


@pytest.mark.parametrize(
    "peer",
    [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"namespaceSelector": {}}],
    ids=["any-address", "any-namespace"],
)
def test_the_policy_check_catches_a_port_opened_to_outsiders(peer):
    """The check above can fail: a rule opening the GCS port beyond the namespace is caught."""
    opened = copy.deepcopy(policies_selecting(HEAD_POD_LABELS))
    opened[0]["spec"]["ingress"].append({"from": [peer], "ports": [{"port": 6379}]})
    with pytest.raises(AssertionError, match="6379 open to"):
        check_only_the_namespace_reaches(opened, 6379)
    with pytest.raises(AssertionError, match="no NetworkPolicy"):
        check_only_the_namespace_reaches([], 6379)


# ------------------------------------------------------------------------- identities

POD_IDENTITIES = {
    # workload: the ServiceAccount its pods run as
    "ray-head": "transfusion-ray-head",
    "ray-worker": "transfusion-ray-worker",
    "mlflow": "transfusion-mlflow",
    "flow-run": "transfusion-flow-run",
}


def workload_pods() -> list[tuple[str, dict]]:
    """(workload, pod spec) of every pod transfusion defines."""
    pods = []
    for _, spec in ray_specs():
        pods.append(("ray-head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [("ray-worker", group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    (mlflow,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    pods.append(("mlflow", mlflow["spec"]["template"]["spec"]))
    pods.append(("flow-run", flow_run_job()["spec"]["template"]["spec"]))
    return pods


@pytest.mark.parametrize(("workload", "pod"), workload_pods(), ids=[w for w, _ in workload_pods()])
def test_each_workload_runs_as_its_own_service_account(workload, pod):
    accounts = service_accounts()
    name = pod["serviceAccountName"]
    assert name == POD_IDENTITIES[workload]
    assert name in accounts
    if workload != "ray-head":  # the autoscaler alone calls the Kubernetes API
        assert (
            pod.get("automountServiceAccountToken") is False
            or accounts[name].get("automountServiceAccountToken") is False
        ), f"{workload} gets a Kubernetes API token it never uses"


def role_bindings_of(account: str) -> list[dict]:
    return [
        b for b in by_kind("RoleBinding") + by_kind("ClusterRoleBinding")
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
    ]  # fmt: skip


def test_only_the_ray_head_holds_kubernetes_rights_and_only_the_autoscalers():
    assert not by_kind("ClusterRoleBinding") and not by_kind("ClusterRole"), "no cluster-wide rights"
    for account in service_accounts():
        bindings = role_bindings_of(account)
        if account != "transfusion-ray-head":
            assert not bindings, f"{account} needs no Kubernetes API rights"
    (binding,) = role_bindings_of("transfusion-ray-head")
    roles = {r["metadata"]["name"]: r for r in by_kind("Role")}
    rules = roles[binding["roleRef"]["name"]]["rules"]
    granted = {(group, resource, verb) for r in rules for group in r["apiGroups"] for resource in r["resources"]
               for verb in r["verbs"]}  # fmt: skip
    assert ("ray.io", "rayclusters", "patch") in granted, "the autoscaler scales by patching its RayCluster"
    assert ("", "pods", "list") in granted
    forbidden = {verb for _, _, verb in granted} & {"create", "delete", "deletecollection", "update", "*", "escalate"}
    assert not forbidden, f"the autoscaler needs no {forbidden}"
    assert not {resource for _, resource, _ in granted} & {"secrets", "*"}, "never Secrets"
    for obj in (binding, roles[binding["roleRef"]["name"]]):
        validate_k8s(obj)


def test_service_accounts_document_their_s3_rights():
    for name, account in service_accounts().items():
        annotations = account["metadata"].get("annotations", {})
        assert "transfusion.io/s3-read" in annotations and "transfusion.io/s3-write" in annotations, name
        validate_k8s(account)


def s3_writes(account: str) -> set[str]:
    annotation = service_accounts()[account]["metadata"]["annotations"]["transfusion.io/s3-write"]
    return {bucket.strip() for bucket in annotation.split(",") if bucket.strip()}


@pytest.mark.parametrize(("workload", "pod"), workload_pods(), ids=[w for w, _ in workload_pods()])
def test_only_the_artifact_writer_gets_the_artifact_buckets_keys(workload, pod):
    """mlflow-s3 holds the artifact bucket's keys; MLflow proxies every artifact, so it is the
    only pod that writes there, and the only one that may read that Secret."""
    writes_artifacts = ARTIFACT_BUCKET in s3_writes(pod["serviceAccountName"])
    assert writes_artifacts == (workload == "mlflow")
    assert ("mlflow-s3" in secret_names(pod)) == writes_artifacts, f"{workload}: artifact keys where not needed"


def test_artifact_destination_is_the_bucket_only_mlflow_writes():
    destination = generated_config_maps()["transfusion-config"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert destination.removeprefix("s3://").split("/")[0] == ARTIFACT_BUCKET


# ------------------------------------------------------------------------------ MLflow


def mlflow_container() -> dict:
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def read_ini(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser["mlflow"]


def test_kubernetes_mlflow_runs_basic_auth_with_the_secrets_admin():
    from tests.deploy_files import parse_mlflow_server

    container = mlflow_container()
    parse_mlflow_server(container["args"][2:])
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    for variable, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                          ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")):  # fmt: skip
        # The server's admin is the user the clients log in as: one Secret, one source.
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = volumes[mount["name"]]["configMap"]["name"]
    (generator,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == config_map]
    (item,) = generator["files"]
    key, file_name = item.split("=", 1)
    assert config_path.endswith("/" + key)
    config = read_ini((K8S / file_name).read_text())
    assert config["default_permission"] == "NO_PERMISSIONS"
    # The user store sits on a volume of the pod (writable under runAsNonRoot), not in the image.
    store = config["database_uri"].removeprefix("sqlite:///")
    assert any(store.startswith(m["mountPath"] + "/") for m in container["volumeMounts"] if m["name"] != mount["name"])


@pytest.mark.parametrize(("workload", "pod"), workload_pods(), ids=[w for w, _ in workload_pods()])
def test_mlflow_clients_authenticate(workload, pod):
    if workload == "mlflow":
        return
    for container in pod["containers"]:
        env = container_env(container)
        if "MLFLOW_TRACKING_URI" not in env:
            continue
        refs = {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}
        assert "mlflow-auth" in refs, f"{workload} logs to MLflow without credentials"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(example_secrets()["mlflow-auth"])


def test_mlflow_auth_files_allow_the_server_to_start():
    """Both auth configs name a permission and an authorization function MLflow knows."""
    from mlflow.server.auth.permissions import ALL_PERMISSIONS

    for path in (K8S / "mlflow-basic-auth.ini", DOCKER / "mlflow-basic-auth.ini"):
        config = read_ini(path.read_text())
        assert config["default_permission"] in ALL_PERMISSIONS
        module, function = config["authorization_function"].split(":")
        assert hasattr(__import__(module, fromlist=[function]), function)
        assert "admin_password" not in config, f"{path.name}: the password comes from the environment"
        assert int(config["auth_cache_ttl_seconds"]) > 0


# ----------------------------------------------------------------------------- Prefect


def test_prefect_server_and_worker_use_the_auth_secret():
    import yaml

    server = yaml.safe_load((K8S / "prefect-server-values.yaml").read_text())["server"]["basicAuth"]
    worker = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]["basicAuth"]
    for values in (server, worker):
        assert values == {"enabled": True, "existingSecret": "prefect-auth"}
    # The charts read the key auth-string, shaped <user>:<password>.
    auth_string = example_secrets()["prefect-auth"]["auth-string"]
    user, sep, password = auth_string.partition(":")
    assert sep and user and password == PLACEHOLDER


# ------------------------------------------------------------------------------ compose


def service_env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (compose()["services"][name].get("environment") or {}).items()}


def required_variable(value: str) -> str:
    match = REQUIRED_REF.search(value)
    assert match, f"{value!r} holds no ${{VAR:?...}} reference"
    return match[1]


def test_compose_mlflow_runs_basic_auth_with_the_clients_password():
    mlflow = compose()["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = service_env("mlflow")
    password = required_variable(env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert required_variable(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    (volume,) = [v for v in mlflow["volumes"] if v.split(":")[1] == config_path]
    source = volume.split(":")[0]
    assert volume.endswith(":ro") and (COMPOSE.parent / source).is_file()
    for name in ("ray-head", "ray-gpu-worker", "flow-server"):
        client = service_env(name)
        assert required_variable(client["MLFLOW_TRACKING_PASSWORD"]) == password, name
        assert client["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"], name


def test_compose_prefect_server_and_clients_share_the_auth_string():
    server = service_env("prefect-server")["PREFECT_SERVER_API_AUTH_STRING"]
    assert required_variable(server) == "PREFECT_API_PASSWORD"
    assert service_env("flow-server")["PREFECT_API_AUTH_STRING"] == server


def test_compose_ray_nodes_and_driver_share_a_token():
    for name in ("ray-head", "ray-gpu-worker", "flow-server"):
        env = service_env(name)
        assert env["RAY_AUTH_MODE"] == "token", name
        assert required_variable(env["RAY_AUTH_TOKEN"]) == "RAY_AUTH_TOKEN", name


def test_compose_env_example_leaves_every_new_secret_a_placeholder():
    example = env_example()
    for key in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_PASSWORD", "RAY_AUTH_TOKEN"):
        assert example[key] == PLACEHOLDER, key


def test_compose_services_that_take_secrets_run_the_checking_entrypoint():
    """Every service of ours that receives a secret starts through docker/entrypoint.sh (the
    images' ENTRYPOINT), which refuses a CHANGE_ME left in docker/.env."""
    dockerfiles = {p.name: p.read_text() for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore"}
    for text in dockerfiles.values():
        assert re.search(r'^ENTRYPOINT \["transfusion-entrypoint"\]', text, re.M)
    for name, service in compose()["services"].items():
        image = service.get("image", "")
        if not image.startswith("transfusion-"):
            continue  # postgres and seaweedfs: their secrets also reach mlflow, which checks them
        assert "entrypoint" not in service, f"{name} replaces the checking entrypoint"


# --------------------------------------------------------------------------- entrypoint


@pytest.mark.parametrize(
    "value",
    [PLACEHOLDER, f"admin:{PLACEHOLDER}", f"postgresql+psycopg://u:{PLACEHOLDER}@postgres:5432/mlflow"],
    ids=["bare", "auth-string", "in-a-url"],
)
def test_entrypoint_refuses_a_placeholder_secret(fake_ray, tmp_path, value):  # noqa: F811
    env, log = fake_ray
    env = {k: v for k, v in env.items() if PLACEHOLDER not in v}  # the test's own environment is fine
    marker = tmp_path / "ran"
    result = run_entrypoint({**env, "MLFLOW_TRACKING_PASSWORD": value, "TRANSFUSION_RAY_JOIN": "1",
                             "RAY_ADDRESS": "head:6379"}, "touch", str(marker))  # fmt: skip
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_PASSWORD" in result.stderr and PLACEHOLDER in result.stderr
    assert value not in result.stderr.replace(f"placeholder {PLACEHOLDER}", ""), "the value itself is not echoed"
    assert not marker.exists(), "the command must not run"
    assert ray_calls(log) == [], "nor may the container join the Ray cluster"


def test_entrypoint_runs_with_real_secrets(fake_ray, tmp_path):  # noqa: F811
    env, _ = fake_ray
    marker = tmp_path / "ran"
    result = run_entrypoint({**env, "MLFLOW_TRACKING_PASSWORD": "x7-real=value\nwith lines"}, "touch", str(marker))
    assert result.returncode == 0, result.stderr
    assert marker.exists()


# ------------------------------------------------------------------------------ secrets


def test_every_new_secret_is_in_the_example_with_placeholders():
    secrets = example_secrets()
    for name in ("mlflow-s3", "mlflow-auth", "mlflow-server", "prefect-auth", "transfusion-ray-auth"):
        assert name in secrets, name
    referenced = set().union(*(secret_names(obj) for obj in all_manifests()))
    assert referenced <= set(secrets), referenced - set(secrets)
    # Secrets are created per cluster, outside the repository: none is applied with the manifests.
    import yaml

    for resource in kustomization()["resources"]:
        kinds = {doc.get("kind") for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc}
        assert "Secret" not in kinds, f"{resource} applies a Secret"
