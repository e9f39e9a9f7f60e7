"""Soak: the Triton integration module, run N times in a row while a CPU load runs on every core.

`tests/integration/test_triton_backend.py` runs a real Triton server (pytriton's Triton 2.51, CPU) and
the inference service in front of it. Under load, Triton 2.51 could crash (SIGSEGV) when a stream was
cancelled at the moment its request completed (docs/triton-crash.md). This runs the module `--runs`
times, each in a fresh pytest process, while `--load` keeps the cores busy:

- `busy` (default): one busy-looping process per core, the way a parallel build or another engineer's
  test run takes the machine;
- `pytest:<args>`: another pytest selection run over and over alongside (e.g. `pytest:tests/unit`),
  the way the rest of the suite loads the CPU;
- `none`.

Each run reports pass or fail, its pytest summary and its time; a failed run's output is kept next to
`--output`, and core files left by a crashing tritonserver (core dumps are enabled for the runs) are
listed. Exit status 1 if any run failed.

    .venv/bin/python benchmarks/triton_soak.py [--runs 20] [--load busy] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "tests/integration/test_triton_backend.py"
BUSY_LOOP = "while True: pass"
UNDER_TEST = ("tests/support/triton_llama_model.py", "inference_service/backends/triton.py")
"""Besides the module: the files whose uncommitted changes the report flags."""


def _allow_core_dumps() -> None:
    # Runs in the child before exec: tritonserver inherits the limit through pytest and pytriton.
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@contextlib.contextmanager
def cpu_load(kind: str) -> Iterator[str]:
    """Run the load until the block ends; yield a description of it."""
    processes: list[subprocess.Popen[bytes]] = []
    if kind == "busy":
        cores = os.cpu_count() or 1
        processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(cores)]
        description = f"{cores} busy-looping processes (one per core)"
    elif kind.startswith("pytest:"):
        args = kind.removeprefix("pytest:").split()
        loop = (
            f"import subprocess, sys\nwhile True:\n"
            f"    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *{args!r}],"
            f" stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        )
        processes = [subprocess.Popen([sys.executable, "-c", loop], cwd=ROOT, start_new_session=True)]
        description = f"`pytest {' '.join(args)}` in a loop alongside"
    elif kind == "none":
        description = "none"
    else:
        raise SystemExit(f"unknown --load {kind!r}: busy, pytest:<args> or none")
    try:
        yield description
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                if kind == "busy":
                    process.kill()
                else:
                    os.killpg(process.pid, 9)  # the loop and the pytest it is running
            process.wait()


def _summary(output: str) -> str:
    """pytest's final summary line (e.g. `13 passed in 95.2s`), without its decoration."""
    lines = [line.strip("= ") for line in output.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    return lines[-1] if lines else (output.strip().splitlines() or ["(no output)"])[-1]


def _failures(output: str) -> list[str]:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)))


def _core_files(since: float) -> list[Path]:
    """Core files written since `since`: where /proc/sys/kernel/core_pattern puts them (a plain `core`
    pattern writes them to the crashing process's working directory: the repository, or pytriton's
    workspace under /tmp)."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("/"):
        places = [(Path(pattern).parent, "*")]
    else:
        places = [(ROOT, "core*"), (Path("/tmp"), "core*"), (Path("/tmp"), "pytriton*/core*")]
    found = []
    for directory, glob in places:
        for path in directory.glob(glob):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime >= since:
                    found.append(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--load", default="busy", help="busy (default), pytest:<args>, or none")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k ...)")
    args = parser.parse_args()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", MODULE, *UNDER_TEST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    command = [sys.executable, "-m", "pytest", MODULE, "-q", "-p", "no:cacheprovider", *args.pytest_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    failed = 0
    with cpu_load(args.load) as load:
        say(f"Triton soak: {args.runs} runs of `pytest {MODULE}`")
        say(f"commit {commit}{' (with uncommitted changes to the files under test)' if dirty else ''}")
        say(f"started {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC on {os.cpu_count()} cores; load: {load}")
        for run in range(1, args.runs + 1):
            run_started = time.time()
            t0 = time.monotonic()
            result = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                preexec_fn=_allow_core_dumps,
            )
            output = result.stdout + result.stderr
            verdict = "pass" if result.returncode == 0 else "FAIL"
            line = f"run {run:3d}: {verdict}  {_summary(output)}  ({time.monotonic() - t0:.0f} s wall)"
            if result.returncode != 0:
                failed += 1
                line += f"\n          failed: {', '.join(_failures(output)) or '?'}"
                if args.output is not None:
                    kept = args.output.with_name(f"{args.output.stem}_run{run}.log")
                    kept.write_text(output)
                    line += f"\n          output kept in {kept.relative_to(ROOT)}"
                if cores := _core_files(run_started):
                    line += f"\n          core files: {', '.join(str(core) for core in cores)}"
            say(line)
    elapsed = time.monotonic() - started
    say(f"{args.runs - failed} of {args.runs} runs passed, {failed} failed; {elapsed / 60:.1f} min in all")
    if args.output is not None:
        args.output.write_text("\n".join(report) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
