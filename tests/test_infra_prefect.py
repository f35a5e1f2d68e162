"""Offline checks of the Prefect deployment files: the Kubernetes work pool's base job template
(Prefect's own validator and the Job it renders), the Prefect Helm charts' values, and
prefect.yaml's deployments against the image and the worker.
"""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlparse

import jsonschema
import yaml

from tests.deploy_files import (
    DOCKER,
    K8S,
    NAMESPACE,
    REPO,
    base_job_template,
    by_kind,
    constraint,
    example_secrets,
    generated_config_maps,
    parse_dockerfile,
    render_flow_run_job,
    validate_k8s,
)


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


# ---------------------------------------------------------------------- prefect.yaml


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
