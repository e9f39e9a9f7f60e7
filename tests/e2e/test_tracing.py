"""One trace per request, from Envoy through the chat service to the inference service, the vector service
(the cache lookup) and the database: real Envoy, chat service (SQLite), inference and embedding services,
all exporting to a real OTLP/gRPC receiver started by the test."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from gateway import run_envoy
from tests.e2e.test_gateway import new_user
from tests.support.chat import bearer
from tests.support.otlp import ReceivedSpan, run_trace_receiver
from tests.support.processes import log_entries
from tests.support.stack import chat_service, embedding_service, gateway_settings, inference_service
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3  # OTLP SpanKind


async def test_a_rest_completion_is_one_trace_across_envoy_chat_inference_and_vectors(tmp_path: Path) -> None:
    async with run_trace_receiver() as receiver:
        with (
            inference_service(otlp_endpoint=receiver.address) as inference,
            embedding_service(tmp_path / "qdrant", otlp_endpoint=receiver.address) as embedding,
            chat_service(
                f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
                inference.address,
                otlp_endpoint=receiver.address,
                cache_address=embedding.address,
                cache_lookup_timeout_s=10,
                # Checks its database and engine ten times a second: none of that may be traced.
                health_check_interval_s=0.1,
            ) as chat,
        ):
            chat_process = chat.process
            settings = gateway_settings([chat.address], otlp_endpoint=receiver.address)
            async with (
                run_envoy(settings, tmp_path / "envoy") as envoy,
                httpx.AsyncClient(base_url=envoy.base_url, timeout=60) as http,
            ):
                user = new_user()
                content = "Name a colour."
                reply = await http.post(
                    "/chat", headers=bearer(user), json={"content": content, "max_tokens": 4}
                )
                assert reply.status_code == 200, reply.text

                def trace_of_the_completion() -> list[ReceivedSpan]:
                    inference_spans = [
                        s
                        for s in receiver.spans
                        if s.service == "chatmesh-inference" and s.name.endswith("/Generate")
                    ]
                    if not inference_spans:
                        return []
                    trace = inference_spans[-1].trace_id
                    return [s for s in receiver.spans if s.trace_id == trace]

                def complete() -> bool:
                    services = {s.service for s in trace_of_the_completion()}
                    return {
                        "chatmesh-gateway",
                        "chatmesh-chat",
                        "chatmesh-inference",
                        "chatmesh-embedding",
                    } <= services

                await eventually(complete, "spans of Envoy, the chat and the inference service in one trace")
                # The chat service's log lines of that request carry its trace id.
                trace = trace_of_the_completion()
                trace_id = trace[0].trace_id
                assert any(e.get("trace_id") == trace_id for e in log_entries(chat_process))
                everything = receiver.spans

    assert_one_parented_trace(trace, everything, reply.text, content)


def assert_one_parented_trace(
    trace: list[ReceivedSpan], everything: list[ReceivedSpan], reply: str, content: str
) -> None:
    """The completion's spans form one tree rooted at Envoy, with the attributes promised and no content."""
    by_id = {s.span_id: s for s in trace}
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "chatmesh-gateway", "Envoy starts the trace"

    def chain(span: ReceivedSpan) -> list[str]:
        services = [span.service]
        while span.parent_span_id:
            span = by_id[span.parent_span_id]
            services.append(span.service)
        return services

    (chat_server,) = [s for s in trace if s.service == "chatmesh-chat" and s.kind == SERVER]
    assert chat_server.name == "/chatmesh.chat.v1.ChatService/CreateChat"
    assert chain(chat_server)[1:] and set(chain(chat_server)[1:]) == {"chatmesh-gateway"}
    (engine_server,) = [
        s
        for s in trace
        if s.service == "chatmesh-inference" and s.kind == SERVER and s.name.endswith("/Generate")
    ]
    parent = by_id[engine_server.parent_span_id]
    assert (parent.service, parent.kind) == ("chatmesh-chat", CLIENT), "the chat service's call to the engine"
    assert "chatmesh-chat" in chain(parent) and chain(parent)[-1] == "chatmesh-gateway"
    # The cache lookup: the chat service's call to the vector service, and the vector service's span.
    (vector_server,) = [
        s
        for s in trace
        if s.service == "chatmesh-embedding" and s.kind == SERVER and s.name.endswith("/Search")
    ]
    lookup = by_id[vector_server.parent_span_id]
    assert (lookup.service, lookup.kind) == ("chatmesh-chat", CLIENT)
    assert chain(lookup)[-1] == "chatmesh-gateway"
    # GenAI attributes, and the chat's id and cache outcome; never the message text or the token.
    assert engine_server.attributes["gen_ai.request.model"]
    assert engine_server.attributes["gen_ai.usage.output_tokens"] >= 1
    assert engine_server.attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    chat_id = re.search(r'"chat_id":\s*"([0-9a-f-]{36})"', reply)
    assert chat_id and chat_server.attributes["chatmesh.chat_id"] == chat_id.group(1)
    assert chat_server.attributes["chatmesh.cache.hit"] is False
    assert any(s.service == "chatmesh-chat" and s.name.startswith(("INSERT", "SELECT")) for s in trace), "SQL"
    # Probes make no traces: Envoy's health checks, and the chat service's own dependency checks (the
    # one GetModelInfo is the start-up's).
    assert not [s for s in everything if "grpc.health" in s.name]
    model_info = [s for s in everything if s.name.endswith("/GetModelInfo")]
    assert len(model_info) <= 2, model_info  # the chat service's call at start-up, and its server side
    assert not [s for s in everything if s.name.startswith("SELECT") and not s.parent_span_id], "DB pings"
    for span in trace:
        rendered = repr(span.attributes)
        assert content not in rendered and "Bearer" not in rendered
