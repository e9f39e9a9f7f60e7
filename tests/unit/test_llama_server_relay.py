"""The llama_server backend's HTTP side against a socket server that behaves like llama-server at its
edges: a kept-alive connection closed just as it is reused, and an SSE stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from inference_service.backends.base import Completion, FinishReason, ModelInfo, Prompt, Sampling, TextDelta
from inference_service.backends.llama_server import LlamaServerBackend
from inference_service.prompt import TEMPLATES


class _NoTokenizer:
    prefix: Sequence[int] = ()

    def encode(self, text: str, *, special: bool) -> list[int]:
        raise AssertionError("generate takes a prepared prompt")


def _sse(*events: dict[str, object]) -> bytes:
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.fixture
async def dropping_server() -> AsyncIterator[tuple[str, list[str]]]:
    """Closes the first connection without answering its request; answers later ones with a stream."""
    connections: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
        if not connections:
            connections.append("dropped")
            writer.close()
            return
        connections.append("answered")
        writer.write(_sse({"content": " Paris"}, {"content": ".", "stop": True, "tokens_predicted": 2}))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


async def test_a_connection_dropped_before_any_response_is_retried_once(
    dropping_server: tuple[str, list[str]],
) -> None:
    base_url, connections = dropping_server
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
        backend = LlamaServerBackend(
            http, _NoTokenizer(), TEMPLATES["transcript"], ModelInfo("m", 512, "llama_server"), slots=1
        )
        try:
            prompt = Prompt(text="User: Hi\nAssistant:", token_ids=[1, 2, 3], message_tokens=[2])
            sampling = Sampling(max_tokens=8, temperature=0.0, top_p=1.0, stop=(), seed=None)
            events = [event async for event in backend.generate(prompt, sampling)]
        finally:
            backend.close()
    assert connections == ["dropped", "answered"]
    assert events == [TextDelta("Paris"), TextDelta("."), Completion(FinishReason.STOP, 3, 2)]


async def test_characters_other_splitters_read_as_line_ends_stay_inside_the_text() -> None:
    # llama-server writes JSON as UTF-8, leaving NEL, U+2028 and the separators \x1c-\x1e unescaped: a
    # line splitter that breaks there (httpx's aiter_lines) cut the event in two, and Generate failed.
    text = "a\x85b\u2028c\x1ed\u2029e\x1cf"
    body = b"".join(
        b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\r\n\r\n"
        for event in ({"content": text}, {"content": ".", "stop": True, "tokens_predicted": 2})
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        backend = LlamaServerBackend(
            http, _NoTokenizer(), TEMPLATES["transcript"], ModelInfo("m", 512, "llama_server"), slots=1
        )
        try:
            prompt = Prompt(text="User: Hi\nAssistant:", token_ids=[1, 2, 3], message_tokens=[2])
            sampling = Sampling(max_tokens=8, temperature=0.0, top_p=1.0, stop=(), seed=None)
            events = [event async for event in backend.generate(prompt, sampling)]
        finally:
            backend.close()
    assert events == [TextDelta(text), TextDelta("."), Completion(FinishReason.STOP, 3, 2)]
