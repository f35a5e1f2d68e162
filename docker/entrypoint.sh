#!/usr/bin/env bash
# Entry point of the transfusion images: runs the container's command, first joining the
# Ray cluster when TRANSFUSION_RAY_JOIN=1.
#
# Why join: a Ray driver given a GCS address (RAY_ADDRESS=<head>:6379) must run on a node
# of the cluster (it talks to a raylet on its own machine), and Ray Client
# (ray://<head>:10001) is the path Ray's documentation steers Ray Train workloads away
# from. So a driver container (the Prefect flow server, a Prefect flow-run pod) joins as
# a node with no CPUs and no GPUs: a full member on which nothing is ever scheduled.
#
# Ray's own head and worker containers do not set TRANSFUSION_RAY_JOIN (KubeRay replaces
# the entry point anyway), so for them this script only execs the command.
set -euo pipefail

# A secret still reading the placeholder of docker/.env.example or
# infra/k8s/secrets.example.yaml would start a service anyone can guess into. Compose's
# ${VAR:?} checks only that a variable is set, so refuse here, naming the variable (never
# its value), before any process sees it.
placeholder="CHANGE_ME"
while IFS='=' read -r -d '' name value; do
    if [[ "${value}" == *"${placeholder}"* ]]; then
        echo "transfusion-entrypoint: ${name} still holds the placeholder ${placeholder}; set a real value (docker/.env or the Kubernetes Secret)" >&2
        exit 2
    fi
done < <(env -0)

if [[ "${TRANSFUSION_RAY_JOIN:-0}" != "1" ]]; then
    exec "$@"
fi

address="${RAY_ADDRESS:-}"
if [[ -z "${address}" || "${address}" == ray://* || "${address}" == auto ]]; then
    echo "transfusion-entrypoint: TRANSFUSION_RAY_JOIN=1 needs RAY_ADDRESS=<head host>:6379, got '${address}'" >&2
    exit 2
fi

# The head may still be starting (a Kubernetes pod scheduled before the RayCluster is up),
# so retry for a while before giving up.
attempts="${TRANSFUSION_RAY_JOIN_ATTEMPTS:-30}"
for ((attempt = 1; ; attempt++)); do
    if ray start --address="${address}" --num-cpus=0 --num-gpus=0 --disable-usage-stats; then
        break
    fi
    if ((attempt >= attempts)); then
        echo "transfusion-entrypoint: could not join the Ray cluster at ${address} after ${attempts} attempts" >&2
        exit 1
    fi
    sleep "${TRANSFUSION_RAY_JOIN_DELAY_S:-10}"
done

# Leave the cluster when the command ends, so the head drops this node at once instead of
# after missed heartbeats.
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

"$@" &
child=$!
# Pass the container's stop signal (docker stop, a Prefect cancellation deleting the pod)
# on to the driver, which then stops its Ray Train runs cleanly.
forwarded=0
trap 'forwarded=1; kill -TERM "${child}" 2>/dev/null || true' TERM INT
status=0
wait "${child}" || status=$?
if ((forwarded)); then
    # The trapped signal cut `wait` short: wait again for the command's own exit status
    # (127 means the first wait had already collected it).
    first="${status}"
    status=0
    wait "${child}" || status=$?
    if ((status == 127)); then
        status="${first}"
    fi
fi
exit "${status}"
