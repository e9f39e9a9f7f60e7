"""The REST API as an OpenAPI 3.1 document, generated from the descriptor set Envoy transcodes with.

Paths and verbs come from the `google.api.http` rules; request and reply bodies from the messages, as the
transcoder renders them (`preserve_proto_field_names`: the proto field names; enums by name; 64-bit
integers as strings, as proto3 JSON has them). A streaming reply is `text/event-stream`, one
`data: <message JSON>` event per message. Errors are the gateway's `{"code", "message", "details"}` body,
`code` the gRPC status name. `tools/protos.py` writes it to `data/openapi.json` (checked for drift
like the stubs); the gateway serves it at `/openapi.json`.

The OpenAI-compatible methods reply with `google.api.HttpBody` (bytes the servicer writes, exactly as
OpenAI's API has them), which no descriptor describes: their bodies and OpenAI's error object are the
JSON schemas below, checked against what the servicer writes by the tests.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor_pb2

from gateway.api import ACCEPTED, OPENAI_SERVICE, PUBLIC_SERVICES, ServiceApi, http_rule
from gateway.openapi_schemas import (
    ERROR_REPLIES,
    ERROR_SCHEMA,
    FIELD_CONSTRAINTS,
    HTTP_BODY_REPLIES,
    LINKS,
    OPENAI_SCHEMAS,
    REQUIRED_FIELDS,
    STRUCT_BODIES,
)

FieldProto = descriptor_pb2.FieldDescriptorProto

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# proto3 JSON writes 64-bit integers as strings, and reads either a string or a number.
_INT64 = {
    "type": ["string", "integer"],
    "format": "int64",
    "pattern": "^-?[0-9]+$",
    "maxLength": 20,
    "minimum": -(2**63),
    "maximum": 2**63 - 1,
}
_UINT64 = {
    "type": ["string", "integer"],
    "format": "uint64",
    "pattern": "^[0-9]+$",
    "maxLength": 20,
    "minimum": 0,
    "maximum": 2**64 - 1,
}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: _INT32,
    FieldProto.TYPE_SINT32: _INT32,
    FieldProto.TYPE_SFIXED32: _INT32,
    FieldProto.TYPE_UINT32: _UINT32,
    FieldProto.TYPE_FIXED32: _UINT32,
    FieldProto.TYPE_INT64: _INT64,
    FieldProto.TYPE_SINT64: _INT64,
    FieldProto.TYPE_SFIXED64: _INT64,
    FieldProto.TYPE_UINT64: _UINT64,
    FieldProto.TYPE_FIXED64: _UINT64,
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}

_HTTP_BODY = ".google.api.HttpBody"

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    ".google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
    ".google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}},
}


class _Messages:
    """Message and enum descriptors by full name (`.chatmesh.chat.v1.Chat`)."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        for file in files.file:
            prefix = f".{file.package}" if file.package else ""
            for enum in file.enum_type:
                self.enums[f"{prefix}.{enum.name}"] = enum
            for message in file.message_type:
                self._add(prefix, message)

    def _add(self, prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum
        for nested in message.nested_type:
            self._add(name, nested)


def _component(full_name: str) -> str:
    return full_name.lstrip(".")


class _Schemas:
    """Builds `components.schemas` on demand, one entry per message or enum reached."""

    def __init__(self, messages: _Messages) -> None:
        self._messages = messages
        self.components: dict[str, Any] = {}

    def ref(self, full_name: str) -> dict[str, Any]:
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        name = _component(full_name)
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursion ends here
            if full_name in self._messages.enums:
                enum = self._messages.enums[full_name]
                self.components[name] = {"type": "string", "enum": [value.name for value in enum.value]}
            else:
                self.components[name] = self.message(full_name)
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, full_name: str, without: frozenset[str] = frozenset()) -> dict[str, Any]:
        message = self._messages.messages[full_name]
        properties = {f.name: self.field(f, full_name) for f in message.field if f.name not in without}
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if full_name in REQUIRED_FIELDS:
            schema["required"] = REQUIRED_FIELDS[full_name]
        return schema

    def field(self, field: descriptor_pb2.FieldDescriptorProto, message: str = "") -> dict[str, Any]:
        """The schema of `field` of `message` (a full name), with the limits the service enforces."""
        schema = self._field(field)
        constraints = FIELD_CONSTRAINTS.get(message, {}).get(field.name, {})
        if "oneOf" in constraints or "type" in constraints:
            schema = {}  # the constraint says the whole shape (a Value the service reads one way)
        return {**schema, **constraints}

    def _field(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type == FieldProto.TYPE_MESSAGE:
            entry = self._messages.messages.get(field.type_name)
            if entry is not None and entry.options.map_entry:
                value = next(f for f in entry.field if f.name == "value")
                return {"type": "object", "additionalProperties": self._field(value)}
            single = self.ref(field.type_name)
        elif field.type == FieldProto.TYPE_ENUM:
            single = self.ref(field.type_name)
        else:
            single = dict(_SCALARS[field.type])
        if field.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single


def openapi_document(
    files: descriptor_pb2.FileDescriptorSet, services: tuple[str, ...] = PUBLIC_SERVICES
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `services`' REST bindings."""
    api = ServiceApi.parse(files, services)
    messages = _Messages(files)
    schemas = _Schemas(messages)
    descriptors = {f"{file.package}.{s.name}": s for file in files.file for s in file.service}
    paths: dict[str, dict[str, Any]] = {}
    ids = operation_ids(api)
    for service in services:
        for method in descriptors[service].method:
            rule = http_rule(method.options)
            info = next(m for m in api.methods if m.service == service and m.name == method.name)
            for binding in info.bindings:
                body = rule.body if binding == info.bindings[0] else ""
                operation = _operation(
                    service, method, binding.template, binding.verb, body, schemas, messages
                )
                operation["operationId"] = ids[(service, method.name)]
                paths.setdefault(_openapi_path(binding.template), {})[binding.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatmesh REST API",
            "version": "v1",
            "description": "The chat API over HTTP/JSON, transcoded by the gateway to chatmesh.chat.v1."
            "ChatService, and the OpenAI-compatible API under /v1 (chatmesh.openai.v1.OpenAIService); gRPC"
            " callers use the same port. Every call needs `Authorization: Bearer <JWT>`.",
        },
        "paths": paths,
        "components": {
            "schemas": {**dict(sorted(schemas.components.items())), "Error": ERROR_SCHEMA, **OPENAI_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    }


def operation_ids(api: ServiceApi) -> dict[tuple[str, str], str]:
    """The operationId of each (service, method): the method's name, unique in the document as OpenAPI
    requires. A name an earlier service already has (`ListModels` of the OpenAI-compatible API beside
    ChatService's) is prefixed with its package's name (`openai.ListModels`), as its schemas are."""
    ids: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    for method in api.methods:
        name = method.name
        if name in taken:
            name = f"{method.service.split('.')[1]}.{name}"
        taken.add(name)
        ids[(method.service, method.name)] = name
    return ids


_VARIABLE = re.compile(r"\{([^}=]+)(=[^}]*)?\}")


def _openapi_path(template: str) -> str:
    return _VARIABLE.sub(lambda match: "{" + match.group(1) + "}", template)


def _operation(
    service: str,
    method: descriptor_pb2.MethodDescriptorProto,
    template: str,
    verb: str,
    body: str,
    schemas: _Schemas,
    messages: _Messages,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": method.name,
        "summary": f"{method.name} ({service}/{method.name} over gRPC)",
    }
    parameters, request_body = _request(service, method, template, body, schemas, messages)
    if request_body is not None:
        operation["requestBody"] = request_body
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = _responses(service, method, schemas)
    return operation


def _request(
    service: str,
    method: descriptor_pb2.MethodDescriptorProto,
    template: str,
    body: str,
    schemas: _Schemas,
    messages: _Messages,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The operation's parameters (path, then query) and its request body, as the transcoder binds the
    request message: the path's variables, then the body (`*`: the rest of the message; a field name:
    that field), else the message's other scalar fields from the query string."""
    request = messages.messages[method.input_type]
    fields = {f.name: f for f in request.field}
    path_fields = [match.group(1) for match in _VARIABLE.finditer(template)]
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            # Resource ids (chat_id, job_id) are UUIDs; anything else is a 400 naming the parameter.
            "schema": {"type": "string", "format": "uuid"}
            if name.endswith("_id")
            else schemas.field(fields[name], method.input_type),
        }
        for name in path_fields
    ]
    struct_body = STRUCT_BODIES.get((service, method.name))
    if struct_body is not None:
        return parameters, {
            "required": True,
            "content": {"application/json": {"schema": schemas.message(struct_body)}},
        }
    if body == "*":
        return parameters, {
            # The transcoder reads a missing body as an empty message, which is a request when no
            # field is required.
            "required": method.input_type in REQUIRED_FIELDS,
            "content": {
                "application/json": {"schema": schemas.message(method.input_type, frozenset(path_fields))}
            },
        }
    if body:
        return parameters, {
            "required": True,
            "content": {"application/json": {"schema": schemas.field(fields[body], method.input_type)}},
        }
    query = [
        {
            "name": field.name,
            "in": "query",
            "required": False,
            "schema": schemas.field(field, method.input_type),
        }
        for field in request.field
        if field.name not in path_fields and field.type != FieldProto.TYPE_MESSAGE
    ]
    return parameters + query, None


def _responses(
    service: str, method: descriptor_pb2.MethodDescriptorProto, schemas: _Schemas
) -> dict[str, Any]:
    """The success reply (202 for the `ACCEPTED` methods; events for a streaming one) and the errors."""
    error_schema = "openai.Error" if service == OPENAI_SERVICE else "Error"
    error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}}
    errors = {code: {"description": text, "content": error} for code, text in ERROR_REPLIES.items()}
    if method.output_type == _HTTP_BODY:
        return {"200": {"description": "OK", "content": HTTP_BODY_REPLIES[(service, method.name)]}, **errors}
    reply = schemas.ref(method.output_type)
    success = "202" if method.name in ACCEPTED else "200"
    if method.server_streaming:
        # Each server-sent event (what OpenAPI 3.2 calls the `itemSchema` of a sequential media type):
        # its `data` is the JSON of one message.
        event = {
            "type": "object",
            "properties": {
                "event": {"type": "string"},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": reply},
            },
            "required": ["data"],
        }
        content = {"text/event-stream": {"schema": event}}
        description = "a stream of events (server-sent events), one per message"
    else:
        content = {"application/json": {"schema": reply}}
        description = "OK"
    return {
        success: {
            "description": description,
            "content": content,
            **({"links": LINKS[method.name]} if method.name in LINKS else {}),
        },
        **errors,
    }
