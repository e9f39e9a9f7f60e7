"""The managed-child helper (`chatmesh.common.children`) on real child processes (small `python -c`
scripts): ready when a file appears or a port listens, an early exit named with its code and its log,
a deadline that says what never happened, and a stop that leaves nothing of the group behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatmesh.common.children import (
    ChildExited,
    ChildNotReady,
    NotReady,
    accepting,
    child_process,
    kill_group,
    new_group_options,
    start_child,
    terminate_sync,
)
from tests.support.processes import free_port, process_group_members
from tests.support.waiting import eventually, eventually_sync

ROOT = Path(__file__).resolve().parents[2]


def script(source: str, *args: object) -> list[str]:
    """The command line running `source` (dedented) with `args` in `sys.argv[1:]`."""
    return [sys.executable, "-c", textwrap.dedent(source), *(str(arg) for arg in args)]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# Writes its argument file once it has started, then waits for a signal.
READY_BY_FILE = """
    import pathlib, signal, sys
    pathlib.Path(sys.argv[1]).write_text("ready")
    signal.pause()
"""

# Starts a grandchild in its own process group, writes the grandchild's pid, then waits; with "stubborn"
# it ignores SIGTERM.
WITH_GRANDCHILD = """
    import pathlib, signal, subprocess, sys
    if sys.argv[2] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    pathlib.Path(sys.argv[1]).write_text(str(grandchild.pid))
    signal.pause()
"""


async def test_ready_when_its_file_appears_and_stopped_by_sigterm(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"

    async def file_written() -> bool:
        return ready_file.exists()

    async with child_process(
        "writer", script(READY_BY_FILE, ready_file), grace_s=10, log_path=tmp_path / "writer.log"
    ) as child:
        await child.wait_ready(file_written, f"{ready_file} written", timeout_s=30)
        assert child.returncode is None
        assert os.getpgid(child.pid) == child.pid, "the leader of a process group of its own"
    assert child.returncode == -signal.SIGTERM


async def test_ready_when_its_port_accepts_connections(tmp_path: Path) -> None:
    port = free_port()
    listener = script(
        """
        import signal, socket, sys
        server = socket.socket()
        server.bind(("127.0.0.1", int(sys.argv[1])))
        server.listen()
        print("listening", flush=True)
        signal.pause()
        """,
        port,
    )
    log = tmp_path / "listener.log"
    async with child_process("listener", listener, grace_s=10, log_path=log) as child:
        await child.wait_ready(lambda: accepting("127.0.0.1", port), f"connections on :{port}", 30)
        assert "listening" in child.log_tail()
    assert log.stat().st_mode & 0o777 == 0o600, "logs may hold prompts: the owner's alone"


async def test_an_early_exit_names_the_child_its_code_the_fix_and_its_log(tmp_path: Path) -> None:
    failing = script("""
        import sys
        print("loading the model", flush=True)
        print("error: no such file: model.gguf", file=sys.stderr)
        sys.exit(3)
    """)

    async def never() -> bool:
        raise NotReady("still loading")

    log = tmp_path / "engine.log"
    async with child_process("engine", failing, grace_s=10, log_path=log) as child:
        with pytest.raises(ChildExited) as raised:
            await child.wait_ready(never, "a healthy engine", 60, hint="set MODEL_PATH to a GGUF file")
    assert raised.value.name == "engine"
    assert raised.value.returncode == 3
    message = str(raised.value)
    assert message.startswith("engine exited with code 3 while starting (set MODEL_PATH to a GGUF file)")
    assert str(log) in message
    assert message.endswith("loading the model\nerror: no such file: model.gguf\n")


async def test_a_deadline_says_what_never_happened_and_the_last_reason(tmp_path: Path) -> None:
    async def loading() -> bool:
        raise NotReady("/health answered 503")

    async with child_process(
        "slow", script(READY_BY_FILE, tmp_path / "ready"), grace_s=10, log_path=tmp_path / "slow.log"
    ) as child:
        with pytest.raises(ChildNotReady) as raised:
            await child.wait_ready(loading, "GET /health 200", timeout_s=0.5)
        assert child.returncode is None, "a child that is not ready in time is left to its owner"
    message = str(raised.value)
    assert message.startswith("slow was not ready within 0 s (waiting for GET /health 200; last: /health")
    assert raised.value.returncode is None


async def accepting_nothing() -> bool:
    return False


async def test_a_relayed_log_goes_to_our_stderr_prefixed_and_the_error_points_at_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    failing = script("import sys; print('bad setting', file=sys.stderr); sys.exit(2)")
    child = await start_child("chat-1", failing, log_path=None)
    try:
        with pytest.raises(ChildExited, match=r"^chat-1 exited with code 2 while starting; its log above"):
            await child.wait_ready(accepting_nothing, "SERVING", 60)
    finally:
        assert await child.stop(10) == 2
    assert "[chat-1] bad setting\n" in capsys.readouterr().err


@pytest.mark.parametrize("child_on_sigterm", ["exits", "stubborn"])
async def test_stop_leaves_nothing_of_the_group_behind(tmp_path: Path, child_on_sigterm: str) -> None:
    # "exits": SIGTERM ends the child but not the grandchild it left behind; "stubborn": the child
    # ignores SIGTERM until the grace period ends and the whole group is killed.
    pid_file = tmp_path / "grandchild"

    async def grandchild_started() -> bool:
        return pid_file.exists() and pid_file.read_text() != ""

    child = await start_child(
        "parent", script(WITH_GRANDCHILD, pid_file, child_on_sigterm), log_path=tmp_path / "parent.log"
    )
    await child.wait_ready(grandchild_started, "the grandchild's pid", 30)
    grandchild = int(pid_file.read_text())
    assert os.getpgid(grandchild) == child.pid
    code = await child.stop(grace_s=0.5)
    assert code == (-signal.SIGTERM if child_on_sigterm == "exits" else -signal.SIGKILL)
    await eventually(lambda: not alive(grandchild), "the grandchild gone with its group")
    assert not process_group_members(child.pid)


async def test_a_child_started_to_die_with_its_parent_does(tmp_path: Path) -> None:
    # A parent of its own (so that the test can SIGKILL it) starts a child with die_with_parent.
    pid_file = tmp_path / "child"
    parent_source = f"""
        import asyncio, pathlib, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from chatmesh.common.children import start_child

        async def main() -> None:
            child = await start_child(
                "sleeper", [sys.executable, "-c", "import signal; signal.pause()"],
                log_path=pathlib.Path(sys.argv[1] + ".log"), die_with_parent=True,
            )
            pathlib.Path(sys.argv[1]).write_text(str(child.pid))
            await asyncio.Event().wait()

        asyncio.run(main())
    """
    parent = await start_child("parent", script(parent_source, pid_file), log_path=tmp_path / "parent.log")
    orphan = 0
    try:
        await eventually(lambda: pid_file.exists() and pid_file.read_text() != "", "the child started")
        orphan = int(pid_file.read_text())
        assert alive(orphan)
        parent.process.kill()
        assert await parent.wait() == -signal.SIGKILL
        await eventually(lambda: not alive(orphan), "the child gone with its parent")
    finally:
        await parent.stop(10)
        if orphan:
            kill_group(orphan)  # it runs in a group of its own


def test_terminate_sync_kills_the_group_of_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = script(
        """
        import pathlib, signal, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path(sys.argv[1]).write_text("ignoring SIGTERM")
        signal.pause()
    """,
        tmp_path / "ready",
    )
    process = subprocess.Popen(stubborn, **new_group_options())
    # The handler must be in place before the SIGTERM, or the default action would end it.
    eventually_sync((tmp_path / "ready").exists, "the child ignoring SIGTERM")
    assert terminate_sync(process, grace_s=0.5) == -signal.SIGKILL
