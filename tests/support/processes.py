"""Running real servers as subprocesses in tests: free ports, gRPC health waits, clean start and stop.

Every process is started in its own session (process group), with stdout and stderr going to a temporary
log file rather than a pipe (a pipe nobody reads blocks a chatty server once it fills up). Failures to
start raise with the tail of that log, so a broken service explains itself in the test report.

Typical use, from a module-scoped fixture::

    address = f"127.0.0.1:{free_port()}"
    env = {"CHATMESH_INFERENCE_ADDRESS": address}
    with run_service("inference_service", env, address, timeout=60) as proc:
        ...  # talk to `address`
    assert proc.returncode == 0
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
                start_new_session=True,
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
    pgid = process.pid  # start_new_session made it the group leader
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + orphan_grace
    while (members := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = tuple(f"{pid} {command_line(pid)}" for pid in members)
    if members:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return StopOutcome(returncode=process.returncode, orphans=orphans)


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


def wait_until_serving(process: LoggedProcess, address: str, timeout: float, service: str = "") -> None:
    """Block until `service` at `address` is SERVING; raise `RuntimeError` with the output's tail if
    `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{_describe(process)} exited with code {process.returncode} before serving on {address}:\n"
                f"{process.output_tail()}"
            )
        if is_serving(address, service, timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{_describe(process)} was not SERVING on {address} after {timeout:.0f} s:\n{process.output_tail()}"
    )


def wait_for_line(process: LoggedProcess, line: str, timeout: float) -> None:
    """Block until `process` prints `line` as a whole line (surrounding whitespace ignored).

    Whole lines, so a readiness marker such as `READY` is not confused with a server log line that
    merely contains the word. Raises `RuntimeError` with the output's tail if the process exits first
    or `timeout` passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(printed.strip() == line for printed in process.output().splitlines()):
            return
        if process.poll() is not None:
            raise RuntimeError(
                f"{_describe(process)} exited with code {process.returncode}:\n{process.output_tail()}"
            )
        time.sleep(0.1)
    raise RuntimeError(
        f"{_describe(process)} did not print {line!r} within {timeout:.0f} s:\n{process.output_tail()}"
    )


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

    Raises `RuntimeError` with the output's tail if the process exits first or `timeout` passes. Blocks:
    from async code, run it with `asyncio.to_thread`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in log_entries(process):
            if matches(entry):
                return entry
        if process.poll() is not None:
            raise RuntimeError(
                f"{_describe(process)} exited with code {process.returncode}:\n{process.output_tail()}"
            )
        time.sleep(0.05)
    raise RuntimeError(
        f"{_describe(process)} wrote no matching log entry within {timeout:.0f} s:\n{process.output_tail()}"
    )


def _describe(process: LoggedProcess) -> str:
    args = process.args
    return " ".join(str(a) for a in args) if isinstance(args, list) else str(args)
