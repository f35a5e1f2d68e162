"""Offline checks of KubeRay's RayCluster and RayJob in infra/k8s, against a structural schema
written from KubeRay's Go API types (no PyPI package ships KubeRay's CRDs), with their pod
templates checked as Kubernetes PodTemplates and their ``ray start`` parameters parsed by Ray.
"""

from __future__ import annotations

import copy
import shlex

import jsonschema
import pytest

from tests.deploy_files import (
    NAMESPACE,
    RAY_CLUSTER_SCHEMA,
    RAY_JOB_SCHEMA,
    check_ray_cluster_spec,
    containers_of,
    generated_config_maps,
    one,
    parse_ray_start,
    rayjob,
)


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
