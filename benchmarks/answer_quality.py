"""Answer quality: short factual and instruction-following questions, asked through the real mesh.

Starts an inference service and a chat service with their default settings (SQLite in a temporary
directory) and Envoy in front, then asks every question of the set in a fresh chat over REST
(`POST /chat` with the question as the first message) and scores the reply against the accepted answers:
correct when the reply's first line holds one of them as a whole word or phrase, ignoring case. Prints
the accuracy overall and per kind, and one JSON line of results.

The set (`benchmarks/data/answer_quality.jsonl`, or `--questions PATH` in the same format) is one JSON
object per line: {"question": "...", "answers": ["...", ...], "kind": "..."}.

Replies are greedy (`--temperature 0`, the one thing set per request) so a run is repeatable; extra
inference settings (a prompt template or preamble to compare) go in the environment as usual:

    .venv/bin/python benchmarks/answer_quality.py [--questions PATH] [--max-tokens 32] [--show-wrong 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.stack import benchmark_chat_env, inference_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import GatewaySettings, run_envoy
from tests.support.chat import TEST_SECRET, token_for
from tests.support.processes import free_port, run_service

DEFAULT_QUESTIONS = Path(__file__).resolve().parent / "data" / "answer_quality.jsonl"
USER = "quality-bench"


@dataclass(frozen=True)
class Item:
    question: str
    answers: tuple[str, ...]
    kind: str


def load(path: Path) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not record.get("question") or not record.get("answers"):
            raise SystemExit(f"{path}:{number}: each line needs a question and a list of answers")
        items.append(Item(record["question"], tuple(record["answers"]), record.get("kind", "other")))
    return items


def is_correct(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether the reply's first non-empty line holds an accepted answer as a whole word or phrase."""
    first = next((line for line in reply.strip().splitlines() if line.strip()), "").casefold()
    return any(
        re.search(rf"(?<![\w]){re.escape(answer.casefold())}(?![\w])", first) is not None
        for answer in answers
    )


async def ask(http: httpx.AsyncClient, question: str, max_tokens: int, temperature: float) -> str:
    """The reply to `question` as the first message of a new chat (server-sent events, read whole)."""
    body = {"content": question, "max_tokens": max_tokens, "temperature": temperature, "skip_cache": True}
    text: list[str] = []
    async with http.stream("POST", "/chat", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                text.append(event.get("delta", ""))
                if "error" in event:
                    raise RuntimeError(f"the completion failed: {event['error']}")
    return "".join(text)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--show-wrong", type=int, default=10, help="print this many wrong replies")
    args = parser.parse_args()
    items = load(args.questions)

    inference, chat = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="chatmesh-quality-") as workdir:
        chat_env = benchmark_chat_env(
            chat,
            f"sqlite+aiosqlite:///{workdir}/chat.db",
            inference,
            log_level="WARNING",
            default_history_strategy=None,
        )
        print(f"{len(items)} questions from {args.questions}; starting the mesh...", flush=True)
        with (
            run_service(
                "inference_service",
                inference_env(inference, log_level="WARNING"),
                inference,
                timeout=120,
            ),
            run_service("chat_service", chat_env, chat, timeout=120),
        ):
            settings = GatewaySettings(
                listen_host="127.0.0.1",
                listen_port=free_port(),
                admin_port=free_port(),
                chat_addresses=[chat],
                jwt_secret=TEST_SECRET,
                rate_limit_per_s=0,
            )
            async with (
                run_envoy(settings, Path(workdir)) as envoy,
                httpx.AsyncClient(
                    base_url=envoy.base_url,
                    headers={"authorization": f"Bearer {token_for(USER)}"},
                    timeout=120,
                ) as http,
            ):
                results = []
                for number, item in enumerate(items, 1):
                    reply = await ask(http, item.question, args.max_tokens, args.temperature)
                    results.append((item, reply, is_correct(reply, item.answers)))
                    if number % 20 == 0:
                        done = sum(ok for _, _, ok in results)
                        print(f"  {number}/{len(items)} asked, {done} correct so far", flush=True)
    right = sum(ok for _, _, ok in results)
    by_kind: Counter[str] = Counter(item.kind for item, _, _ in results)
    right_by_kind: Counter[str] = Counter(item.kind for item, _, ok in results if ok)
    print(f"accuracy: {right}/{len(results)} = {right / len(results):.1%}")
    for kind in sorted(by_kind):
        print(
            f"  {kind:<12} {right_by_kind[kind]}/{by_kind[kind]} = {right_by_kind[kind] / by_kind[kind]:.1%}"
        )
    wrong = [(item, reply) for item, reply, ok in results if not ok]
    for item, reply in wrong[: args.show_wrong]:
        print(f"  wrong: {item.question!r} -> {reply.strip()[:80]!r} (accepted: {', '.join(item.answers)})")
    summary = {
        "questions": str(args.questions),
        "asked": len(results),
        "correct": right,
        "accuracy": round(right / len(results), 4),
        "by_kind": {kind: round(right_by_kind[kind] / by_kind[kind], 4) for kind in sorted(by_kind)},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
