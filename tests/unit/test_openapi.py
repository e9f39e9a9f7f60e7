"""The OpenAPI document of the REST API (chatmesh/gateway/data/openapi.json, written by `make protos`
from the descriptor set): a valid OpenAPI 3.1 document that describes every REST binding of the service."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from chatmesh.gateway.api import ServiceApi, default_descriptor_path
from chatmesh.gateway.openapi import openapi_document

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
    for method in api.methods:
        for binding in method.bindings:
            operation = document["paths"][binding.template][binding.verb.lower()]
            assert operation["operationId"] == method.name
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == {part[1:-1] for part in binding.template.split("/") if part.startswith("{")}
            content = operation["responses"]["200"]["content"]
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
