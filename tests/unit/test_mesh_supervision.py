"""`chatmesh run`'s supervisor on real (tiny) processes: a service that keeps crashing right after it
starts is restarted with a growing backoff, then given up on."""

from __future__ import annotations

import pytest

from chatmesh.mesh import MeshSettings, ServiceSpec, _start, supervise


async def test_a_service_that_keeps_crashing_is_restarted_then_given_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `python -m` of a module that does not exist exits at once with code 1: a crash on every start.
    spec = ServiceSpec("broken", "chatmesh_no_such_module", "127.0.0.1:1")
    settings = MeshSettings(restart_backoff_s=0.1, max_fast_crashes=3, startup_timeout_s=10)
    await supervise(await _start(spec), settings)
    said = capsys.readouterr().err
    restarts = [line for line in said.splitlines() if "restarting it in" in line]
    assert [line.split("restarting it in ")[1] for line in restarts] == [
        "0.1 s (the rest keep serving)",
        "0.2 s (the rest keep serving)",
    ]
    assert "broken exited with code 1" in said
    assert "broken crashed 3 times in a row" in said
    assert said.rstrip().endswith("giving up")
