"""The OpenAI-compatible API against the native REST completion, through the same Envoy, same run.

One inference service, one chat replica (semantic cache off, so that every call generates) on a
throw-away PostgreSQL database (127.0.0.1:5432), Envoy in front. Calls alternate between:

- native: `POST /chat/{chat_id}/completion` (server-sent `CompletionEvent`s) on a chat created beforehand
  with the system prompt (outside the timing);
- OpenAI: `POST /v1/chat/completions` with `"stream": true` and the same system prompt and question.

Both read the raw bytes as they arrive over HTTP/1.1 (no client library in the way). Measured: time to
the first token of text (TTFT) and tokens/s from the first token to the end, same prompt, greedy, same
seed. Targets (issue 12): OpenAI >= 0.97 of native tokens/s, TTFT <= +3 ms at p50.

    .venv/bin/python benchmarks/openai_api.py [--runs 20] [--max-tokens 128] [--ttft-runs 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import EnvoyProcess, GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, token_for
from tests.support.databases import fresh_postgres_database
from tests.support.processes import free_port, run_service
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import benchmark_chat_env, inference_env

USER = "bench-user"
QUESTION = "Count to 300."
_NATIVE_TEXT = re.compile(rb'"delta":"')
_OPENAI_TEXT = re.compile(rb'"delta":\{"content":"[^"]')
_TOKENS = re.compile(rb'"completion_tokens":"?(\d+)')


@dataclass
class Run:
    ttft_s: float
    tokens: int
    streaming_s: float  # first token to the end

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.streaming_s


async def post_stream(
    envoy: EnvoyProcess, path: str, body: dict[str, object], text: re.Pattern[bytes]
) -> Run:
    """POST `body` to `path` and read the event stream as it arrives."""
    host, port = envoy.listen_address.rsplit(":", 1)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.perf_counter()
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token_for(USER)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + payload
    )
    first: float | None = None
    buffer = b""
    while chunk := await reader.read(65536):
        buffer += chunk
        if first is None and text.search(buffer):
            first = time.perf_counter()
    ended = time.perf_counter()
    writer.close()
    tokens = [int(m.group(1)) for m in _TOKENS.finditer(buffer)]
    assert first is not None and tokens and b" 200 " in buffer[:20], buffer[:300] + buffer[-300:]
    return Run(first - started, tokens[-1], ended - first)


async def native(envoy: EnvoyProcess, max_tokens: int) -> Run:
    chat = await post_json(envoy, "/chat", {"system_prompt": COUNTING_SYSTEM_PROMPT})
    body = {"content": QUESTION, "max_tokens": max_tokens, "temperature": 0, "seed": 7, "skip_cache": True}
    chat_id = chat["chat"]["chat_id"]  # type: ignore[index]
    return await post_stream(envoy, f"/chat/{chat_id}/completion", body, _NATIVE_TEXT)


async def openai_compatible(envoy: EnvoyProcess, model: str, max_tokens: int) -> Run:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": COUNTING_SYSTEM_PROMPT},
            {"role": "user", "content": QUESTION},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 7,
    }
    return await post_stream(envoy, "/v1/chat/completions", body, _OPENAI_TEXT)


async def post_json(
    envoy: EnvoyProcess, path: str, body: dict[str, object] | None = None
) -> dict[str, object]:
    host, port = envoy.listen_address.rsplit(":", 1)
    payload = json.dumps(body).encode() if body is not None else b""
    verb = "POST" if body is not None else "GET"
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"{verb} {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token_for(USER)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + payload
    )
    response = await reader.read()
    writer.close()
    head, _, rest = response.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        # One chunk is enough for these small replies (a stream of one event for POST /chat).
        rest = rest.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    text = rest.decode().strip()
    if text.startswith("data: "):
        text = text.removeprefix("data: ").split("\n", 1)[0]
    value: dict[str, object] = json.loads(text)
    return value


def p50(values: list[float]) -> float:
    return statistics.median(values)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="long completions per side (tokens/s)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ttft-runs", type=int, default=60, help="short completions per side (TTFT)")
    args = parser.parse_args()

    inference, chat = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    async with fresh_postgres_database() as url:
        print("starting the inference service, a chat replica and Envoy...", flush=True)
        chat_env = benchmark_chat_env(chat, url, inference, log_level="WARNING")
        settings = GatewaySettings(
            listen_host="127.0.0.1",
            listen_port=free_port(),
            admin_port=free_port(),
            chat_addresses=[chat],
            jwt_secret=TEST_SECRET,
            rate_limit_per_s=1_000_000,
            rate_limit_burst=1_000_000,
        )
        with (
            run_service(
                "inference_service", inference_env(inference, log_level="WARNING"), inference, timeout=120
            ),
            run_service("chat_service", chat_env, chat, timeout=120),
            tempfile.TemporaryDirectory(prefix="chatmesh-openai-bench-") as workdir,
        ):
            async with run_envoy(settings, Path(workdir)) as envoy:
                models = await post_json(envoy, "/v1/models")
                model = str(models["data"][0]["id"])  # type: ignore[index]
                results: dict[str, dict[str, list[Run]]] = {"ttft": {}, "rate": {}}
                for series, runs, max_tokens in (
                    ("ttft", args.ttft_runs, 4),
                    ("rate", args.runs, args.max_tokens),
                ):
                    print(
                        f"{series}: {runs} alternating runs per side, max_tokens {max_tokens}...", flush=True
                    )
                    sides = {
                        "native": results[series].setdefault("native", []),
                        "openai": results[series].setdefault("openai", []),
                    }
                    for run in range(runs + 2):
                        order = ("native", "openai") if run % 2 == 0 else ("openai", "native")
                        for side in order:
                            result = (
                                await native(envoy, max_tokens)
                                if side == "native"
                                else await openai_compatible(envoy, model, max_tokens)
                            )
                            if run >= 2:  # warm-up
                                sides[side].append(result)
    ttft = {side: [r.ttft_s * 1000 for r in runs] for side, runs in results["ttft"].items()}
    paired = statistics.median(o - n for o, n in zip(ttft["openai"], ttft["native"], strict=True))
    print(f"TTFT ({args.ttft_runs} runs per side, 4 tokens):")
    for side in ("native", "openai"):
        print(
            f"  {side:<7} p50 {p50(ttft[side]):.2f} ms,"
            f" p90 {statistics.quantiles(ttft[side], n=10)[-1]:.2f} ms"
        )
    print(
        f"  OpenAI - native at p50: {p50(ttft['openai']) - p50(ttft['native']):+.2f} ms;"
        f" paired median {paired:+.2f} ms (target <= +3 ms)"
    )
    rates = {side: [r.tokens_per_s for r in runs] for side, runs in results["rate"].items()}
    tokens = {side: results["rate"][side][0].tokens for side in rates}
    print(f"tokens/s ({args.runs} runs per side, {args.max_tokens} max tokens; generated {tokens}):")
    for side in ("native", "openai"):
        print(
            f"  {side:<7} p50 {p50(rates[side]):.1f} tokens/s"
            f" (runs {min(rates[side]):.1f}-{max(rates[side]):.1f})"
        )
    print(f"  OpenAI / native: {p50(rates['openai']) / p50(rates['native']):.3f} (target >= 0.97)")


if __name__ == "__main__":
    asyncio.run(main())
