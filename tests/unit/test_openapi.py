"""The OpenAPI document of the REST API (envoy/gateway/data/openapi.json, written by `make protos`
from the descriptor set): a valid OpenAPI 3.1 document that describes every REST binding of the service."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from chat_service import openai_api
from chat_service import validation as service_rules
from gateway import openapi_schemas
from gateway.api import ACCEPTED, ServiceApi, default_descriptor_path
from gateway.openapi import openapi_document, operation_ids

DOCUMENT = default_descriptor_path().parent / "openapi.json"


def committed() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


def test_the_committed_document_is_the_one_the_descriptor_set_gives() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(default_descriptor_path().read_bytes())
    assert committed() == json.loads(json.dumps(openapi_document(files)))


def test_it_is_a_valid_openapi_3_1_document() -> None:
    validate(committed())  # raises with the offending path if not


def test_every_rest_binding_is_described_with_its_path_parameters_and_reply() -> None:
    document = committed()
    api = ServiceApi.load(default_descriptor_path())
    described = {
        (verb.upper(), path) for path, operations in document["paths"].items() for verb in operations
    }
    expected = {(b.verb, b.template) for b in api.bindings()}
    assert described == expected
    ids = operation_ids(api)
    assert ids[("chatmesh.chat.v1.ChatService", "ListModels")] == "ListModels"
    assert ids[("chatmesh.openai.v1.OpenAIService", "ListModels")] == "openai.ListModels"
    for method in api.methods:
        for binding in method.bindings:
            operation = document["paths"][binding.template][binding.verb.lower()]
            assert operation["operationId"] == ids[(method.service, method.name)]
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == {part[1:-1] for part in binding.template.split("/") if part.startswith("{")}
            success = "202" if method.name in ACCEPTED else "200"
            content = operation["responses"][success]["content"]
            openai = method.service == "chatmesh.openai.v1.OpenAIService"
            if openai and method.streaming:  # JSON, or events with "stream": true
                media = ["application/json", "text/event-stream"]
            else:
                media = ["text/event-stream" if method.streaming else "application/json"]
            assert list(content) == media, (method.name, list(content))
            assert operation["responses"]["429"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/openai.Error" if openai else "#/components/schemas/Error"
            }


def test_every_reference_resolves() -> None:
    document = committed()
    text = json.dumps(document)
    names = {ref.split("/")[-1] for ref in _refs(document)}
    assert names, text[:200]
    assert names <= set(document["components"]["schemas"])


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_the_limits_written_into_the_document_are_the_ones_the_service_enforces() -> None:
    for name in ("MAX_CONTENT_CHARS", "MAX_TITLE_CHARS", "MAX_SYSTEM_PROMPT_CHARS", "MAX_REQUEST_ID_CHARS"):
        assert getattr(openapi_schemas, name) == getattr(service_rules, name), name
    assert openapi_schemas.MAX_CHATS_PAGE == service_rules.MAX_CHATS_PAGE
    assert openapi_schemas.MAX_MESSAGES_PAGE == service_rules.MAX_MESSAGES_PAGE
    assert set(openapi_schemas.FIELD_CONSTRAINTS[".chatmesh.openai.v1.ChatMessage"]["role"]["enum"]) == set(
        openai_api._ROLES
    )
    paths = committed()["paths"]
    complete = paths["/chat/{chat_id}/completion"]["post"]["requestBody"]
    assert complete["required"] is True
    content = complete["content"]["application/json"]["schema"]["properties"]["content"]
    assert content["maxLength"] == service_rules.MAX_CONTENT_CHARS and content["minLength"] == 1
    query = {p["name"]: p["schema"] for p in paths["/chats"]["get"]["parameters"]}
    assert query["page_size"]["maximum"] == service_rules.MAX_CHATS_PAGE


def test_links_lead_from_replies_to_operations_that_take_what_they_hold() -> None:
    document = committed()
    operations = {
        operation["operationId"]: operation
        for path in document["paths"].values()
        for operation in path.values()
    }
    linked = set()
    for name, operation in operations.items():
        for status, reply in operation["responses"].items():
            for link in reply.get("links", {}).values():
                assert status in ("200", "202"), (name, status)
                target = operations[link["operationId"]]
                names = {p["name"] for p in target.get("parameters", [])}
                assert set(link["parameters"]) <= names, (name, link)
                linked |= {(name, link["operationId"])}
    # A new chat leads to every call on a chat, and a job to its reads.
    for taker in ("Complete", "GetMessages", "UpdateChat", "DeleteChat", "SubmitCompletion"):
        assert ("CreateChat", taker) in linked
    assert {("SubmitCompletion", "GetJob"), ("SubmitCompletion", "WatchJob")} <= linked
