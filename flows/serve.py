"""Serves every deployment of ``prefect.yaml`` from this process, or registers them with a
process work pool for a ``prefect worker`` to run.

    python -m flows.serve                                  # serve, against $PREFECT_API_URL
    python -m flows.serve --work-pool transfusion-local    # create the pool, deploy to it, exit

The deployments (names, parameters, schedules, concurrency limits) are read from the
repository's ``prefect.yaml``, so serving and ``prefect deploy --all`` agree. It ships
inside the ``flows`` package (``flows/prefect.yaml`` links to it in a checkout), so an
installed wheel serves the same deployments from any directory.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path

import yaml


def prefect_yaml_text() -> str:
    """The deployments file, from the installed package or the checkout alike."""
    return resources.files("flows").joinpath("prefect.yaml").read_text()


def load_deployment_specs(path: Path | None = None) -> list[dict]:
    data = yaml.safe_load(path.read_text() if path else prefect_yaml_text())
    return list(data.get("deployments") or [])


def build_deployments(names: list[str] | None = None, *, work_pool: str | None = None):
    """``work_pool``: deploy by module path (``flows.grid.transfusion``) so a worker's flow-run
    process imports the installed package or checkout on its ``sys.path``, with no pull step,
    image or remote storage."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.grid import transfusion

    deployments = []
    for spec in load_deployment_specs():
        if names and spec["name"] not in names:
            continue
        if spec["entrypoint"] != "flows/grid.py:transfusion":
            raise ValueError(f"deployment {spec['name']!r}: unknown entrypoint {spec['entrypoint']!r}")
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"), active=bool(s.get("active", True)))
            for s in spec.get("schedules") or []
        ]
        deployments.append(
            transfusion.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters=spec.get("parameters"),
                tags=spec.get("tags"),
                concurrency_limit=spec.get("concurrency_limit"),
                schedules=schedules or None,
                **({"work_pool_name": work_pool, "entrypoint_type": EntrypointType.MODULE_PATH} if work_pool else {}),
            )
        )
    return deployments


def ensure_process_work_pool(name: str) -> None:
    """Creates the process work pool ``name`` with Prefect's default job template unless it exists;
    one of another type under that name is an error rather than silently reused."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
        except ObjectAlreadyExists:
            existing = client.read_work_pool(name)
            if existing.type != "process":
                raise ValueError(
                    f"work pool {name!r} exists with type {existing.type!r}, not 'process'; choose another name"
                ) from None


def deploy_to_work_pool(pool: str, names: list[str] | None = None) -> list[str]:
    """Registers the deployments of ``prefect.yaml`` with the process work pool ``pool``."""
    ensure_process_work_pool(pool)
    deployments = build_deployments(names, work_pool=pool)
    for deployment in deployments:
        deployment.apply()
    return [deployment.name for deployment in deployments]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="serve only these deployment names")
    parser.add_argument("--ready-file", type=Path, help="touched once the deployments are registered")
    parser.add_argument(
        "--work-pool", help="register the deployments with this process work pool (created if missing) and exit"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if args.work_pool:
        for name in deploy_to_work_pool(args.work_pool, args.only):
            print(f"deployed transfusion/{name} to work pool {args.work_pool}")
        return
    from prefect import serve

    deployments = build_deployments(args.only)
    if args.ready_file:
        # serve() registers the deployments before polling; register first so the
        # ready file means "prefect deployment run" will find them.
        for deployment in deployments:
            deployment.apply()
        args.ready_file.touch()
    serve(*deployments, print_starting_message=True)


if __name__ == "__main__":
    main()
