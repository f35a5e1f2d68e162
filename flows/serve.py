"""Serves every deployment of ``prefect.yaml`` from this process (no work pool needed).

    python -m flows.serve            # against $PREFECT_API_URL

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


def build_deployments(names: list[str] | None = None):
    from prefect.schedules import Cron

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
            )
        )
    return deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="serve only these deployment names")
    parser.add_argument("--ready-file", type=Path, help="touched once the deployments are registered")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
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
