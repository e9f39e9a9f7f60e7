"""Running real servers as subprocesses in tests: free ports, gRPC health waits, clean start and stop.

Every process is started in its own session (process group), with stdout and stderr going to a temporary
log file rather than a pipe (a pipe nobody reads blocks a chatty server once it fills up); starting it
and stopping its group are the shared runtime's (`chatmesh.common.children`), waiting is `eventually`'s.
Failures to start raise with the tail of that log, so a broken service explains itself in the test report.

Typical use, from a module-scoped fixture::

    address = f"127.0.0.1:{free_port()}"
    env = inference_env(address)  # tests.support.stack: typed settings, rendered to CHATMESH_* variables
    with run_service("inference_service", env, address, timeout=60) as proc:
        ...  # talk to `address`
    assert proc.returncode == 0
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.common.children import ChildExited, kill_group, new_group_options, terminate_sync
from tests.support.waiting import eventually_sync

STOP_TIMEOUT_S = 15.0
"""How long a process gets to exit after SIGTERM before its whole process group is killed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is released before returning, so another process could grab it in between; in practice
    the kernel hands out ephemeral ports round-robin, which makes a clash very unlikely.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_block(offsets: Sequence[int]) -> int:
    """A port `base` such that `base + offset` is free on 127.0.0.1 for every offset (for a program that
    derives several ports from one setting)."""
    for _ in range(100):
        base = free_port()
        sockets: list[socket.socket] = []
        try:
            for offset in offsets:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no free block of ports at offsets {list(offsets)}")


def is_serving(address: str, service: str = "", timeout: float = 1.0) -> bool:
    """One blocking health check: True if `service` at `address` answers SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class LoggedProcess(subprocess.Popen[bytes]):
    """A subprocess whose stdout and stderr go to a temporary log file, in its own process group."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        with tempfile.NamedTemporaryFile(prefix="chatmesh-test-", suffix=".log", delete=False) as log:
            super().__init__(
                list(args),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so teardown can reach anything it spawned (see stop_process).
                **new_group_options(),
            )
        self.log_path = Path(log.name)

    def output(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def output_tail(self, max_chars: int = 4000) -> str:
        """The last `max_chars` characters of the output, for error messages."""
        return self.output()[-max_chars:]

    def remove_log(self) -> None:
        """Delete the log file (once nobody needs the output any more)."""
        self.log_path.unlink(missing_ok=True)


def start_process(args: Sequence[str], env: Mapping[str, str] | None = None) -> LoggedProcess:
    """Start `args` with os.environ + HF_HUB_OFFLINE=1 + `env`; stop it with `stop_process`."""
    return LoggedProcess(args, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def _live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/<pid>/stat after the command name) for every non-zombie process (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name is parenthesised and may contain spaces; after it: state, ppid, pgrp, ...
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z":
            yield int(entry.name), fields


def command_line(pid: int) -> str:
    """The command line of `pid` (empty if it has exited)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 0, utime 11, stime 12 (in clock ticks).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid`."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def find_processes(fragment: str) -> list[int]:
    """Pids of live processes whose command line contains `fragment` (e.g. a server's unique port flag)."""
    return [pid for pid, _ in _live_processes() if fragment in command_line(pid)]


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """How a process ended under `stop_process`."""

    returncode: int
    """Exit code (negative: killed by that signal)."""
    orphans: tuple[str, ...]
    """"pid command-line" of processes of its group that outlived it and had to be SIGKILLed."""


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S, orphan_grace: float = 2.0
) -> StopOutcome:
    """SIGTERM `process` and wait up to `timeout` s for it to exit (then SIGKILL its whole group).

    Processes of its group still alive `orphan_grace` seconds after it exited (e.g. a server it spawned
    and failed to stop) are SIGKILLed and reported, so a test never leaves orphans behind and can
    assert that there were none.
    """
    pgid = process.pid  # started in a session of its own: the group leader
    returncode = terminate_sync(process, timeout)
    # What it started gets `orphan_grace` to exit after it; whatever is left then is reported and killed.
    with contextlib.suppress(AssertionError):
        eventually_sync(lambda: not process_group_members(pgid), "its group empty", orphan_grace)
    members = process_group_members(pgid)
    orphans = tuple(f"{pid} {command_line(pid)}" for pid in members)
    if members:
        kill_group(pgid)
    return StopOutcome(returncode=returncode, orphans=orphans)


@contextlib.contextmanager
def run_service(module: str, env: Mapping[str, str], address: str, timeout: float) -> Iterator[LoggedProcess]:
    """Run `python -m <module>` until the `with` block ends; yield the process once `address` is SERVING.

    `env` is added to os.environ (plus HF_HUB_OFFLINE=1). Raises `RuntimeError` with the tail of the
    process's output if it exits or is not SERVING within `timeout` seconds. On exit the process gets
    SIGTERM and is waited for, so `returncode` is set (0 for a clean shutdown) when the block ends;
    anything it spawned and left behind is killed.
    """
    process = start_process([sys.executable, "-m", module], env)
    try:
        wait_until_serving(process, address, timeout)
        yield process
    finally:
        stop_process(process)
        process.remove_log()


def fail_if_exited(process: LoggedProcess, when: str) -> None:
    """`ChildExited` (naming `process`, its exit code and the end of its output) if it has exited; `when`
    says what it had not done yet (`before serving on ...`)."""
    if process.poll() is not None:
        raise ChildExited(
            _describe(process), process.returncode, process.log_path, process.output_tail(), when=when
        )


def wait_until_serving(process: LoggedProcess, address: str, timeout: float, service: str = "") -> None:
    """Block until `service` at `address` is SERVING; `ChildExited` with the output's tail if `process`
    exits first, `AssertionError` with it after `timeout` seconds."""

    def serving() -> bool:
        fail_if_exited(process, f"before serving on {address}")
        return is_serving(address, service, timeout=0.5)

    what = f"{_describe(process)} SERVING on {address}"
    eventually_sync(serving, what, timeout, detail=process.output_tail)


def wait_for_line(process: LoggedProcess, line: str, timeout: float) -> None:
    """Block until `process` prints `line` as a whole line (surrounding whitespace ignored).

    Whole lines, so a readiness marker such as `READY` is not confused with a server log line that
    merely contains the word. `ChildExited` with the output's tail if the process exits first,
    `AssertionError` with it after `timeout`.
    """

    def printed() -> bool:
        if any(said.strip() == line for said in process.output().splitlines()):
            return True
        fail_if_exited(process, f"before printing {line!r}")
        return False

    eventually_sync(printed, f"{_describe(process)} printing {line!r}", timeout, detail=process.output_tail)


def log_entries(process: LoggedProcess) -> list[dict[str, Any]]:
    """The JSON log lines (the services' default log format) the process has written so far."""
    entries = []
    for line in process.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


def wait_for_log_entry(
    process: LoggedProcess, matches: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Block until `process` writes a JSON log entry for which `matches` is true; return it.

    `ChildExited` with the output's tail if the process exits first, `AssertionError` with it after
    `timeout`. Blocks: from async code, run it with `asyncio.to_thread`.
    """
    found: list[dict[str, Any]] = []

    def written() -> bool:
        found.extend(entry for entry in log_entries(process) if matches(entry))
        if found:
            return True
        fail_if_exited(process, "before writing the log entry waited for")
        return False

    what = f"{_describe(process)} writing a matching log entry"
    eventually_sync(written, what, timeout, detail=process.output_tail)
    return found[0]


def _describe(process: LoggedProcess) -> str:
    args = process.args
    return " ".join(str(a) for a in args) if isinstance(args, list) else str(args)
