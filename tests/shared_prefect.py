"""One real ``prefect server`` per test process, for the ``transfusion`` commands tests start.

Each command would otherwise start and stop a temporary server of its own, about 15 CPU
seconds a command. This module holds the server (not conftest, which pytest imports under
a second name beside the ``tests.conftest`` that tests import).
"""

from __future__ import annotations

import os
from pathlib import Path

_SERVERS: list = []


def shared_prefect_api_url() -> str:
    """The shared server's API URL; the server starts on first use, in the test process's
    temporary folder (next to its ``PREFECT_HOME``, which ``pytest_configure`` sets)."""
    if not _SERVERS:
        from flows.runtime import free_port, start_prefect_server

        home = Path(os.environ["PREFECT_HOME"]).parent / "shared-prefect-server"
        home.mkdir(exist_ok=True)
        _SERVERS.append(start_prefect_server(home, port=free_port(), services=False))
    return _SERVERS[0].url


def stop_shared_prefect() -> None:
    while _SERVERS:
        _SERVERS.pop().stop()
