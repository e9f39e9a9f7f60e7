"""Answer quality: short factual questions and an instruction-following set, asked through the real mesh.

Starts an inference service and a chat service with their default settings (SQLite in a temporary
directory) and Envoy in front, then asks every item in a fresh chat over REST (`POST /chat` with the
question as the first message) and scores the reply. Prints the accuracy overall and per kind, the
decoding speed (median over replies of completion tokens per second of generation) and one JSON line of
results per set.

Two sets (`--set questions|instructions|both`):

- questions (`benchmarks/data/answer_quality.jsonl`, or `--questions PATH`): one JSON object per line,
  {"question": "...", "answers": ["...", ...], "kind": "..."}; correct when the reply's first non-empty
  line holds one of the answers as a whole word or phrase, ignoring case. `--max-tokens` (32).
- instructions (`benchmarks/data/instructions.jsonl`, or `--instructions PATH`): {"question": "...",
  "kind": "...", "check": {"type": ..., ...}}; correct when the machine check (`CHECKS` below: a code
  block holding given strings, numbered lines, a JSON object with given keys, a word limit, capitals...)
  passes on the whole reply. `--instruction-max-tokens` (160): instructions need longer replies.

Replies are greedy (`--temperature 0`, set per request) so a run is repeatable. The model and its prompt
format are the inference service's settings, given here by name or taken from the environment as usual:
`--model` is a GGUF file (`CHATMESH_INFERENCE_GGUF_PATH`) or a catalog name (`CHATMESH_INFERENCE_MODELS`),
`--template` and `--preamble` set `CHATMESH_INFERENCE_PROMPT_TEMPLATE` and `..._PROMPT_PREAMBLE`:

    .venv/bin/python benchmarks/answer_quality.py [--set both] [--model PATH|NAME] [--template chatml]
        [--preamble none] [--show-wrong 10]

The services run this checkout's code (PYTHONPATH is set to it, envoy/ included), so a run from a git
worktree of a fixed commit measures that commit whatever the main checkout holds meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
CODE_PATHS = [str(REPO), str(REPO / "envoy")]
"""This checkout's code: the repository root and envoy/ (the `gateway` package), ahead of the venv's
editable install, here and in the services started (a worktree measures its own commit)."""
sys.path[:0] = CODE_PATHS

from gateway import GatewaySettings, run_envoy  # noqa: E402
from tests.support.chat import TEST_SECRET, token_for  # noqa: E402
from tests.support.processes import free_port, run_service  # noqa: E402
from tests.support.stack import benchmark_chat_env, inference_env  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_QUESTIONS = DATA / "answer_quality.jsonl"
DEFAULT_INSTRUCTIONS = DATA / "instructions.jsonl"
USER = "quality-bench"
MIN_TOKENS_FOR_SPEED = 8
"""Replies shorter than this are left out of the tokens/s median: their rate is mostly timer noise."""

Check = Mapping[str, Any]


@dataclass(frozen=True)
class Item:
    """One question of a set and how its reply is scored: accepted answers (first line) or a check."""

    question: str
    kind: str
    answers: tuple[str, ...] = ()
    check: Check | None = None

    def is_correct(self, reply: str) -> bool:
        """Whether `reply` answers this item."""
        if self.check is not None:
            return passes(self.check, reply)
        return first_line_holds(reply, self.answers)


@dataclass(frozen=True)
class Reply:
    """What came back for one question, with its timing."""

    text: str
    completion_tokens: int
    generation_s: float
    """From the first text delta to the last event: the decoding after the first token."""

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed: the tokens after the first over the time they took (None for a short reply)."""
        if self.completion_tokens < MIN_TOKENS_FOR_SPEED or self.generation_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.generation_s


def load(path: Path) -> list[Item]:
    """The items of a set file: each line either has `answers` (a question) or a `check` (an instruction)."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        question, kind = record.get("question"), record.get("kind", "other")
        if question and record.get("answers"):
            items.append(Item(question, kind, answers=tuple(record["answers"])))
        elif question and isinstance(record.get("check"), dict):
            validate_check(record["check"], f"{path}:{number}")
            items.append(Item(question, kind, check=record["check"]))
        else:
            raise SystemExit(f"{path}:{number}: each line needs a question and answers or a check")
    return items


def has_phrase(text: str, phrase: str) -> bool:
    """Whether `text` holds `phrase` as a whole word or phrase, ignoring case."""
    pattern = rf"(?<![\w]){re.escape(phrase.casefold())}(?![\w])"
    return re.search(pattern, text.casefold()) is not None


def first_line_holds(reply: str, answers: Sequence[str]) -> bool:
    """Whether the reply's first non-empty line holds an accepted answer as a whole word or phrase."""
    first = next((line for line in reply.strip().splitlines() if line.strip()), "")
    return any(has_phrase(first, answer) for answer in answers)


# The instruction set's checks: each takes the check's parameters and the whole reply.

NUMBER_WORDS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"),
    *("nineteen", "twenty"),
)
"""Numbers the `number` check also accepts in words, by value."""


def _words(text: str) -> list[str]:
    """Whitespace-separated pieces that hold a letter or digit (markdown and punctuation alone are not)."""
    return [word for word in text.split() if re.search(r"\w", word)]


def _contains_any(check: Check, reply: str) -> bool:
    return any(has_phrase(reply, value) for value in check["values"])


def _regex(check: Check, reply: str) -> bool:
    flags = 0 if check.get("case_sensitive") else re.IGNORECASE
    return re.search(check["pattern"], reply.strip(), flags | re.MULTILINE) is not None


def _number(check: Check, reply: str) -> bool:
    """The expected number as a whole number (not part of 180 or 8.5), in digits or (up to 20) in words."""
    value = int(check["value"])
    if re.search(rf"(?<![\d.]){value}(?!\d|\.\d)", reply.replace(",", "")) is not None:
        return True
    return 0 <= value < len(NUMBER_WORDS) and has_phrase(reply, NUMBER_WORDS[value])


def _code_block(check: Check, reply: str) -> bool:
    """A fenced block (closed, or running to the end of a reply cut by max_tokens) holding every string
    of `all` and, when given, one of `any` (case-sensitive: code)."""
    for block in re.findall(r"```[^\n]*\n(.*?)(?:```|\Z)", reply, re.DOTALL):
        if all(text in block for text in check.get("all", ())) and (
            not check.get("any") or any(text in block for text in check["any"])
        ):
            return True
    return False


def _numbered_lines(check: Check, reply: str) -> bool:
    count = len(re.findall(r"^\s*\**\d+[.)]\**\s+\S", reply, re.MULTILINE))
    return int(check.get("min", 1)) <= count <= int(check.get("max", count))


def _bullet_lines(check: Check, reply: str) -> bool:
    count = len(re.findall(r"^\s*[-*•]\s+\S", reply, re.MULTILINE))
    return int(check.get("min", 1)) <= count <= int(check.get("max", count))


def _table_rows(check: Check, reply: str) -> bool:
    count = sum(1 for line in reply.splitlines() if line.strip().startswith("|"))
    return count >= int(check["min"])


def _in_order(check: Check, reply: str) -> bool:
    text, position = reply.casefold(), 0
    for value in check["values"]:
        found = text.find(value.casefold(), position)
        if found < 0:
            return False
        position = found + len(value)
    return True


def _first_json(reply: str) -> object:
    """The first JSON object or array in the reply (inside a code fence or not), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", reply):
        try:
            value, _ = decoder.raw_decode(reply, match.start())
        except ValueError:
            continue
        return value
    return None


def _json(check: Check, reply: str) -> bool:
    """A JSON object with the given `keys` (and, when given, `values`, compared as text ignoring case), or
    a JSON array of `array_length` items."""
    value = _first_json(reply)
    if "array_length" in check:
        return isinstance(value, list) and len(value) == int(check["array_length"])
    if not isinstance(value, dict) or not all(key in value for key in check["keys"]):
        return False
    expected = check.get("values", {})
    return all(str(value[key]).casefold() == str(want).casefold() for key, want in expected.items())


def _uppercase(check: Check, reply: str) -> bool:
    letters = [char for char in reply if char.isalpha()]
    return bool(letters) and all(char.isupper() for char in letters)


def _lowercase(check: Check, reply: str) -> bool:
    letters = [char for char in reply if char.isalpha()]
    return bool(letters) and all(char.islower() for char in letters)


def _max_words(check: Check, reply: str) -> bool:
    return 1 <= len(_words(reply)) <= int(check["n"])


def _max_sentences(check: Check, reply: str) -> bool:
    sentences = [part for part in re.split(r"[.!?]+(?:\s+|$)", reply.strip()) if re.search(r"\w", part)]
    return 1 <= len(sentences) <= int(check["n"])


def _starts_with(check: Check, reply: str) -> bool:
    words = _words(reply)
    first = re.sub(r"\W", "", words[0]).casefold() if words else ""
    return first in {value.casefold() for value in check["values"]}


def _all(check: Check, reply: str) -> bool:
    return all(passes(part, reply) for part in check["checks"])


CHECKS: Mapping[str, Callable[[Check, str], bool]] = {
    "contains_any": _contains_any,
    "regex": _regex,
    "number": _number,
    "code_block": _code_block,
    "numbered_lines": _numbered_lines,
    "bullet_lines": _bullet_lines,
    "table_rows": _table_rows,
    "in_order": _in_order,
    "json": _json,
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "max_words": _max_words,
    "max_sentences": _max_sentences,
    "starts_with": _starts_with,
    "all": _all,
}


def passes(check: Check, reply: str) -> bool:
    """Whether `reply` passes `check` (a mapping with a `type` of `CHECKS` and its parameters)."""
    return CHECKS[check["type"]](check, reply)


def validate_check(check: Check, where: str) -> None:
    """Exit naming `where` if `check` (or a part of it) has no known type."""
    if check.get("type") not in CHECKS:
        raise SystemExit(f"{where}: unknown check type {check.get('type')!r} (known: {', '.join(CHECKS)})")
    for part in check.get("checks", ()):
        validate_check(part, where)


async def ask(http: httpx.AsyncClient, question: str, max_tokens: int, temperature: float) -> Reply:
    """The reply to `question` as the first message of a new chat (server-sent events, read whole)."""
    body = {"content": question, "max_tokens": max_tokens, "temperature": temperature, "skip_cache": True}
    text: list[str] = []
    completion_tokens = 0
    first_delta: float | None = None
    async with http.stream("POST", "/chat", json=body) as response:
        if response.is_error:
            await response.aread()
            raise RuntimeError(f"POST /chat: {response.status_code} {response.text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"the completion failed: {event['error']}")
            if event.get("delta"):
                first_delta = time.perf_counter() if first_delta is None else first_delta
                text.append(event["delta"])
            usage = event.get("usage") or {}
            completion_tokens = int(
                usage.get("completionTokens", usage.get("completion_tokens", completion_tokens))
            )
    generation_s = time.perf_counter() - first_delta if first_delta is not None else 0.0
    return Reply("".join(text), completion_tokens, generation_s)


def inference_settings(args: argparse.Namespace) -> dict[str, object]:
    """The inference service's settings for the model and prompt format asked for on the command line."""
    settings: dict[str, object] = {"log_level": "WARNING"}
    if args.model:
        if Path(args.model).is_file():
            settings["gguf_path"] = Path(args.model).resolve()
            settings["model_name"] = Path(args.model).stem
        else:
            settings["models"] = args.model
    if args.template:
        settings["prompt_template"] = args.template
    if args.preamble:
        settings["prompt_preamble"] = args.preamble
    return settings


@dataclass(frozen=True)
class SetRun:
    """One set to ask: its name, items and reply budget."""

    name: str
    path: Path
    items: list[Item]
    max_tokens: int


def report(run: SetRun, results: list[tuple[Item, Reply, bool]], show_wrong: int) -> dict[str, object]:
    """Print one set's accuracy per kind, speed and wrong replies; the summary for the JSON line."""
    right = sum(ok for _, _, ok in results)
    by_kind: Counter[str] = Counter(item.kind for item, _, _ in results)
    right_by_kind: Counter[str] = Counter(item.kind for item, _, ok in results if ok)
    speeds = [speed for _, reply, _ in results if (speed := reply.tokens_per_s) is not None]
    tokens_per_s = round(statistics.median(speeds), 1) if speeds else None
    print(f"{run.name}: accuracy {right}/{len(results)} = {right / len(results):.1%}")
    for kind in sorted(by_kind):
        share = right_by_kind[kind] / by_kind[kind]
        print(f"  {kind:<12} {right_by_kind[kind]}/{by_kind[kind]} = {share:.1%}")
    print(
        f"  tokens/s (median over {len(speeds)} replies of >= {MIN_TOKENS_FOR_SPEED} tokens): {tokens_per_s}"
    )
    wrong = [(item, reply) for item, reply, ok in results if not ok]
    for item, reply in wrong[:show_wrong]:
        expected = ", ".join(item.answers) if item.check is None else json.dumps(item.check)
        print(f"  wrong: {item.question!r} -> {reply.text.strip()[:300]!r} (expected: {expected})")
    return {
        "set": run.name,
        "path": str(run.path),
        "asked": len(results),
        "correct": right,
        "accuracy": round(right / len(results), 4),
        "tokens_per_s": tokens_per_s,
        "by_kind": {kind: round(right_by_kind[kind] / by_kind[kind], 4) for kind in sorted(by_kind)},
    }


async def ask_all(
    base_url: str, runs: list[SetRun], temperature: float
) -> list[list[tuple[Item, Reply, bool]]]:
    """Every item of every set, asked one at a time through the gateway at `base_url`."""
    every: list[list[tuple[Item, Reply, bool]]] = []
    async with httpx.AsyncClient(
        base_url=base_url, headers={"authorization": f"Bearer {token_for(USER)}"}, timeout=300
    ) as http:
        for run in runs:
            results: list[tuple[Item, Reply, bool]] = []
            for number, item in enumerate(run.items, 1):
                reply = await ask(http, item.question, run.max_tokens, temperature)
                results.append((item, reply, item.is_correct(reply.text)))
                if number % 20 == 0:
                    done = sum(ok for _, _, ok in results)
                    print(f"  {run.name}: {number}/{len(run.items)} asked, {done} correct so far", flush=True)
            every.append(results)
    return every


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", choices=("questions", "instructions", "both"), default="both")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--instructions", type=Path, default=DEFAULT_INSTRUCTIONS)
    parser.add_argument("--max-tokens", type=int, default=32, help="reply budget for the questions")
    parser.add_argument("--instruction-max-tokens", type=int, default=160, help="... for the instructions")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model", help="a GGUF file or a catalog name; default: the service's default")
    parser.add_argument("--template", choices=("auto", "transcript", "gemma", "chatml"))
    parser.add_argument("--preamble", choices=("none", "few-shot"))
    parser.add_argument("--limit", type=int, help="ask only the first LIMIT items of each set (a quick try)")
    parser.add_argument("--show-wrong", type=int, default=10, help="print this many wrong replies per set")
    args = parser.parse_args()
    runs = []
    if args.set in ("questions", "both"):
        runs.append(SetRun("questions", args.questions, load(args.questions), args.max_tokens))
    if args.set in ("instructions", "both"):
        runs.append(
            SetRun("instructions", args.instructions, load(args.instructions), args.instruction_max_tokens)
        )

    runs = [SetRun(run.name, run.path, run.items[: args.limit], run.max_tokens) for run in runs]
    settings = inference_settings(args)
    # The services run this checkout's code, whatever the venv's editable install points at.
    code = {"PYTHONPATH": os.pathsep.join(filter(None, [*CODE_PATHS, os.environ.get("PYTHONPATH")]))}
    inference, chat = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    environment = {key: value for key, value in os.environ.items() if key.startswith("CHATMESH_INFERENCE_")}
    print(f"code: {REPO}; inference settings: {settings}; from the environment: {environment}")
    with tempfile.TemporaryDirectory(prefix="chatmesh-quality-") as workdir:
        chat_env = benchmark_chat_env(
            chat,
            f"sqlite+aiosqlite:///{workdir}/chat.db",
            inference,
            log_level="WARNING",
            default_history_strategy=None,
        )
        sizes = ", ".join(f"{len(run.items)} {run.name} from {run.path}" for run in runs)
        print(f"{sizes}; starting the mesh...", flush=True)
        with (
            run_service(
                "inference_service", {**inference_env(inference, **settings), **code}, inference, timeout=300
            ),
            run_service("chat_service", {**chat_env, **code}, chat, timeout=120),
        ):
            gateway = GatewaySettings(
                listen_host="127.0.0.1",
                listen_port=free_port(),
                admin_port=free_port(),
                chat_addresses=[chat],
                jwt_secret=TEST_SECRET,
                rate_limit_per_s=0,
            )
            async with run_envoy(gateway, Path(workdir)) as envoy:
                every = await ask_all(envoy.base_url, runs, args.temperature)
    summaries = [report(run, results, args.show_wrong) for run, results in zip(runs, every, strict=True)]
    for summary in summaries:
        print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
