"""Starting the servers a grid needs: a Ray head that missed Ray's own start limit is started once more."""

from __future__ import annotations

import pytest

from flows import runtime


def _head_starts(monkeypatch, failures: list[str]) -> list[int]:
    """Makes each start of the head process fail with the next of ``failures`` (then succeed); the ports started."""
    started: list[int] = []

    def start(command, *, host, port, home, env):
        started.append(port)
        if len(started) <= len(failures):
            raise RuntimeError(
                f"Ray head on {host}:{port} exited with code 1; see ray.log\n{failures[len(started) - 1]}"
            )
        return "head"

    monkeypatch.setattr(runtime, "_started_ray_head", start)
    monkeypatch.setattr(runtime, "require_free_port", lambda *args: None)
    return started


def test_a_head_whose_raylet_missed_rays_start_limit_is_started_once_more(monkeypatch, tmp_path):
    timed_out = "Exception: The current node timed out during startup. This could happen because ..."
    started = _head_starts(monkeypatch, [timed_out])
    assert runtime.start_ray_head(tmp_path, port=6399) == "head"
    assert started == [6399, 6399]

    started = _head_starts(monkeypatch, [timed_out, timed_out])
    with pytest.raises(RuntimeError, match="timed out during startup"):
        runtime.start_ray_head(tmp_path, port=6399)
    assert len(started) == 2


def test_a_head_that_fails_otherwise_is_not_started_again(monkeypatch, tmp_path):
    started = _head_starts(monkeypatch, ["ValueError: --num-cpus must be an integer"])
    with pytest.raises(RuntimeError, match="num-cpus"):
        runtime.start_ray_head(tmp_path, port=6399)
    assert started == [6399]
