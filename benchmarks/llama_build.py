"""Tokens/s of the installed llama.cpp build, to compare builds (portable vs native) on one machine.

Greedy generation of a fixed number of tokens from the bundled Gemma 3 270M, prompt processing and
generation timed apart, at 1 and 2 threads; the build's own CPU feature report is printed first so the
figures name what they measured. To compare another build, install its wheel into a folder and put that
folder first on the path:

    .venv/bin/python benchmarks/llama_build.py [--runs 5] [--max-tokens 128]
    .venv/bin/pip install --no-deps --target /tmp/native-llama <native wheel>
    .venv/bin/python benchmarks/llama_build.py --compare /tmp/native-llama --rounds 6

`--compare` alternates the two builds round by round, each in a fresh process, so that background load
hits both alike, and reports the median tokens/s of each and their ratio.

Why the project ships the portable build (tools/install_llama.py): docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from inference_service.model_files import bundled_gguf_path

PROMPT = "User: Write a long story about a lighthouse keeper and a storm.\nAssistant:"


def measure(llm: llama_cpp.Llama, max_tokens: int) -> tuple[float, float]:
    """(prompt seconds, generated tokens per second) for one greedy generation of max_tokens."""
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    started = time.perf_counter()
    first: float | None = None
    generated = 0
    for _ in llm.generate(tokens, temp=0.0, reset=True):
        generated += 1
        if first is None:
            first = time.perf_counter()
        if generated >= max_tokens:
            break
    ended = time.perf_counter()
    assert first is not None
    return first - started, (generated - 1) / (ended - first)


def compare(other: str, rounds: int, max_tokens: int) -> None:
    """Alternate this environment's build and the one in `other`, one fresh process per round."""
    builds = {"installed": None, "other": other}
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(rounds):
        for name, path in builds.items():
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
            out = subprocess.run(
                [sys.executable, __file__, "--runs", "1", "--max-tokens", str(max_tokens), "--raw"],
                env=env, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            for line in out.splitlines():
                if line.startswith("build:") and round_ == 0:
                    print(f"{name}: {line}")
                if line.startswith("raw "):
                    _, thread_count, rate = line.split()
                    rates.setdefault((name, int(thread_count)), []).append(float(rate))
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    for threads in (1, 2):
        mine = statistics.median(rates[("installed", threads)])
        theirs = statistics.median(rates[("other", threads)])
        print(
            f"threads={threads}: installed {mine:.1f} tokens/s, other {theirs:.1f} tokens/s,"
            f" installed/other {mine / theirs:.3f} (medians of {rounds} alternating rounds)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--compare", help="folder holding another llama_cpp build to alternate with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.rounds, args.max_tokens)
        return
    print(f"llama-cpp-python {llama_cpp.__version__} from {Path(llama_cpp.__file__).parent}")
    print(f"build: {llama_cpp.llama_print_system_info().decode().strip()}", flush=True)
    path = str(bundled_gguf_path())
    for threads in (1, 2):
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        measure(llm, 8)  # warm-up: page in the weights
        prompt_s, rates = [], []
        for run in range(args.runs):
            p, r = measure(llm, args.max_tokens)
            prompt_s.append(p)
            rates.append(r)
            if args.raw:
                print(f"raw {threads} {r:.3f}", flush=True)
            print(f"  threads={threads} run {run + 1}/{args.runs}: {r:.1f} tokens/s", flush=True)
        print(
            f"threads={threads}: generation {statistics.median(rates):.1f} tokens/s (median of {args.runs},"
            f" best {max(rates):.1f}), prompt+first token {statistics.median(prompt_s) * 1000:.0f} ms",
            flush=True,
        )
        llm.close()


if __name__ == "__main__":
    main()
