"""Child processes the project starts and owns: start one in a process group of its own, wait until it is
ready or has exited, stop the whole group.

Every process the project starts goes through here: the launcher's services, NATS and Envoy (`chatmesh
run`, `python -m gateway`), the inference service's llama-server, and the tests' servers
(tests/support/processes.py, which waits through `eventually` and stops with `terminate_sync`).

- **A group of its own** (`new_group_options`): Ctrl-C at the terminal reaches only the parent, which
  stops its children in order; and stopping reaches whatever a child spawned.
- **Ready or exited** (`Child.wait_ready`): readiness lives in another process and can only be polled;
  the wait ends on the condition or on the child's exit, and the deadline only turns a hang into an
  error. Either error names the child, its exit code or what it never did, the fix when the caller
  knows one, and the end of its log.
- **Stop** (`Child.stop`): SIGTERM to the child, which stops what it started itself; after a grace
  period SIGKILL to the whole group, and whatever of the group outlived the child is killed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmesh.common.private_files import open_private

LOG_TAIL_CHARS = 4000
"""How much of a child's log an error quotes."""

ReadyCheck = Callable[[], Awaitable[bool]]
"""A readiness check: True once ready. It may raise `NotReady` (or `OSError`, `TimeoutError`: connection
refused, no answer) to say what it still waits for; other exceptions end the wait."""


class NotReady(Exception):
    """Raised by a readiness check to say what is missing; the timeout's error quotes the last one."""


class WaitTimedOut(RuntimeError):
    """`poll_until`'s deadline passed before the check held."""

    def __init__(self, what: str, timeout_s: float, reason: str) -> None:
        super().__init__(f"no {what} within {timeout_s:.0f} s (last: {reason})")
        self.what, self.timeout_s, self.reason = what, timeout_s, reason


class ChildFailed(RuntimeError):
    """A child exited while the caller waited for it, or was not ready in time."""

    def __init__(self, message: str, name: str, returncode: int | None) -> None:
        super().__init__(message)
        self.name, self.returncode = name, returncode


def _log_note(log_path: Path | None, log_tail: str) -> str:
    if log_path is None:
        return "; its log above says why"
    return f"; the end of its log ({log_path}):\n{log_tail}"


def _hint_note(hint: str) -> str:
    return f" ({hint})" if hint else ""


class ChildExited(ChildFailed):
    """The child exited while the caller waited for it (to start, to print something)."""

    def __init__(
        self,
        name: str,
        returncode: int,
        log_path: Path | None,
        log_tail: str = "",
        *,
        when: str = "while starting",
        hint: str = "",
    ) -> None:
        super().__init__(
            f"{name} exited with code {returncode} {when}{_hint_note(hint)}{_log_note(log_path, log_tail)}",
            name,
            returncode,
        )


class ChildNotReady(ChildFailed):
    """The child still ran but was not ready by the deadline."""

    def __init__(
        self, name: str, waited: WaitTimedOut, log_path: Path | None, log_tail: str, hint: str
    ) -> None:
        super().__init__(
            f"{name} was not ready within {waited.timeout_s:.0f} s (waiting for {waited.what}; last:"
            f" {waited.reason}){_hint_note(hint)}{_log_note(log_path, log_tail)}",
            name,
            None,
        )


async def poll_until(
    check: ReadyCheck,
    what: str,
    timeout_s: float,
    *,
    interval_s: float = 0.1,
    abort: Callable[[], None] | None = None,
) -> float:
    """Call `check` every `interval_s` until it returns True; the seconds that took.

    `what` names the condition for the error. `abort`, called before each try, raises to end the wait
    early (a child that exited). `WaitTimedOut` (with the check's last `NotReady` reason) once
    `timeout_s` has passed; a check still running then is cancelled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reason = "no answer yet"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if abort is not None:
                    abort()
                try:
                    if await check():
                        return loop.time() - started
                    reason = "not yet"
                except (NotReady, OSError, TimeoutError) as exc:
                    reason = str(exc) or repr(exc)
                await asyncio.sleep(interval_s)  # polling another process: there is nothing to await
    except TimeoutError:
        raise WaitTimedOut(what, timeout_s, reason) from None


async def accepting(host: str, port: int) -> bool:
    """A readiness check: something accepts TCP connections on `host:port`."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise NotReady(f"{host}:{port} refuses connections ({exc.strerror or exc})") from None
    writer.close()
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent dies, even by SIGKILL, so that a crashed
    parent never leaves an orphan holding memory and cores (Linux only)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def new_group_options(die_with_parent: bool = False) -> dict[str, Any]:
    """Keyword arguments of `subprocess.Popen` and `asyncio.create_subprocess_exec` that start a child in
    a session (so a process group) of its own; `die_with_parent`: SIGTERMed when this process dies
    (Linux; elsewhere ignored)."""
    options: dict[str, Any] = {"start_new_session": True}
    if die_with_parent and sys.platform == "linux":
        options["preexec_fn"] = _die_with_parent
    return options


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in group `pgid` (none left: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def read_tail(path: Path, max_chars: int = LOG_TAIL_CHARS) -> str:
    """The last `max_chars` bytes of the file at `path`, as text ("" if it is missing)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - max_chars))
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


async def _relay_lines(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(f"[{name}] {line.decode(errors='replace')}")


@dataclass(eq=False)
class Child:
    """A child process started by `start_child`, leader of its own process group."""

    name: str
    """How errors and logs name it."""
    process: asyncio.subprocess.Process
    log_path: Path | None
    """Where its stdout and stderr go; None: its stderr is relayed to ours, each line prefixed `[name]`."""
    _relay: asyncio.Task[None] | None = field(default=None, repr=False)
    _stop_asked: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """Its pid, which is also its process group's id."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (negative: killed by that signal), else None."""
        return self.process.returncode

    def log_tail(self, max_chars: int = LOG_TAIL_CHARS) -> str:
        """The end of its log file, for error messages ("" when its log is relayed)."""
        return "" if self.log_path is None else read_tail(self.log_path, max_chars)

    def raise_if_exited(self, hint: str = "") -> None:
        """`ChildExited` (with the end of its log) if it has exited."""
        if self.returncode is not None:
            raise ChildExited(self.name, self.returncode, self.log_path, self.log_tail(), hint=hint)

    async def wait_ready(
        self, check: ReadyCheck, what: str, timeout_s: float, *, interval_s: float = 0.1, hint: str = ""
    ) -> float:
        """Poll `check` (see `ReadyCheck`) until it holds; the seconds that took. `ChildExited` if the
        child exits first, `ChildNotReady` after `timeout_s`; both quote its log and `hint` (the fix)."""
        try:
            return await poll_until(
                check, what, timeout_s, interval_s=interval_s, abort=lambda: self.raise_if_exited(hint)
            )
        except WaitTimedOut as exc:
            raise ChildNotReady(self.name, exc, self.log_path, self.log_tail(), hint) from None

    async def wait(self) -> int:
        """Wait until it exits (and its relayed log is written out); its exit code."""
        code = await self.process.wait()
        if self._relay is not None:
            await self._relay
        return code

    def ask_to_stop(self) -> None:
        """SIGTERM it, once (a second SIGTERM kills a service that is already shutting down), if it runs."""
        if self.returncode is None and not self._stop_asked:
            self._stop_asked = True
            self.process.send_signal(signal.SIGTERM)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM it (unless asked already) and wait up to `grace_s`, then SIGKILL its whole group; what
        is left of the group after it exited is killed too. Its exit code."""
        self.ask_to_stop()
        try:
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            kill_group(self.pid)
        code = await self.process.wait()
        if self._stop_asked:
            # Anything it started and left behind. Only when it ran until asked to stop: its pid stays the
            # group's id while a member lives, and just after its exit the number names no one else's
            # group; long after (it crashed), a new process may have it.
            kill_group(self.pid)
        if self._relay is not None:
            await self._relay
        return code


async def start_child(
    name: str,
    args: Sequence[str],
    *,
    log_path: Path | None,
    append_log: bool = False,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> Child:
    """Start `args` in a process group of its own, stdin from /dev/null.

    `log_path`: the file (mode 0600, truncated unless `append_log`) its stdout and stderr go to; None:
    stdout discarded and stderr relayed to ours line by line, prefixed `[name]` (the launcher's services,
    whose logs the terminal shows). `env`: its whole environment (None: ours). `die_with_parent`: see
    `new_group_options`."""
    options = new_group_options(die_with_parent)
    if log_path is None:
        process = await asyncio.create_subprocess_exec(
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            **options,
        )
        assert process.stderr is not None
        return Child(name, process, None, asyncio.create_task(_relay_lines(name, process.stderr)))
    with open_private(log_path, "ab" if append_log else "wb") as log:
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, **options
        )
    return Child(name, process, log_path)


@contextlib.asynccontextmanager
async def child_process(
    name: str,
    args: Sequence[str],
    *,
    grace_s: float,
    log_path: Path | None,
    append_log: bool = False,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> AsyncIterator[Child]:
    """`start_child` for the block, then `Child.stop(grace_s)` (also when the block fails). The block
    waits for readiness itself (`Child.wait_ready`), after whatever it does meanwhile."""
    child = await start_child(
        name, args, log_path=log_path, append_log=append_log, env=env, die_with_parent=die_with_parent
    )
    try:
        yield child
    finally:
        await child.stop(grace_s)


def terminate_sync(process: subprocess.Popen[Any], grace_s: float) -> int:
    """`Child.stop` for a `subprocess.Popen` started with `new_group_options` (the tests' servers, which
    are synchronous): SIGTERM it, wait up to `grace_s`, then SIGKILL its whole group. The rest of its
    group is left to the caller, which reports what outlived it before `kill_group`. Its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
    return process.wait()
