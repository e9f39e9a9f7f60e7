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

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    ".google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
    ".google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}},
}

ERROR_SCHEMA = {
    "type": "object",
    "description": "A failed call: the gRPC status by name, its message, and its google.rpc details"
    " (BadRequest names the field, RetryInfo the delay).",
    "properties": {
        "code": {"type": "string", "examples": ["INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"]},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["code", "message"],
}

_NULLABLE_STRING = {"type": ["string", "null"]}
_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}
_FINISH_REASON = {"type": ["string", "null"], "enum": ["stop", "length", None]}
OPENAI_SCHEMAS: dict[str, dict[str, Any]] = {
    "openai.ChatCompletion": {
        "type": "object",
        "description": "OpenAI's `chat.completion` object.",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": _NULLABLE_STRING,
                                "refusal": _NULLABLE_STRING,
                            },
                            "required": ["role", "content"],
                        },
                        "logprobs": {"type": "null"},
                        "finish_reason": _FINISH_REASON,
                    },
                    "required": ["index", "message", "finish_reason"],
                },
            },
            "usage": _USAGE,
            "system_fingerprint": _NULLABLE_STRING,
        },
        "required": ["id", "object", "created", "model", "choices", "usage"],
    },
    "openai.ChatCompletionChunk": {
        "type": "object",
        "description": "OpenAI's `chat.completion.chunk` object: one server-sent event of a streamed reply.",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": {
                            "type": "object",
                            "properties": {"role": {"const": "assistant"}, "content": _NULLABLE_STRING},
                        },
                        "logprobs": {"type": "null"},
                        "finish_reason": _FINISH_REASON,
                    },
                    "required": ["index", "delta", "finish_reason"],
                },
            },
            "usage": {"oneOf": [_USAGE, {"type": "null"}]},
            "system_fingerprint": _NULLABLE_STRING,
        },
        "required": ["id", "object", "created", "model", "choices"],
    },
    "openai.Error": {
        "type": "object",
        "description": "OpenAI's error body; `code` is the gRPC status name in lower case.",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "examples": ["invalid_request_error", "rate_limit_error"]},
                    "param": _NULLABLE_STRING,
                    "code": _NULLABLE_STRING,
                },
                "required": ["message", "type"],
            }
        },
        "required": ["error"],
    },
}

_HTTP_BODY = ".google.api.HttpBody"
_HTTP_BODY_REPLIES: dict[tuple[str, str], dict[str, Any]] = {
    (OPENAI_SERVICE, "CreateChatCompletion"): {
        "application/json": {"schema": {"$ref": "#/components/schemas/openai.ChatCompletion"}},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": 'With `"stream": true`: one event per chunk, then `data: [DONE]`; an'
                " error after the stream started is an event holding an OpenAI error object.",
                "properties": {
                    # `[DONE]` is not JSON, so the data is no JSON media type: a reader that parsed every
                    # event as one (the fuzzing does) would fail on the last.
                    "data": {
                        "type": "string",
                        "description": "the JSON of an `openai.ChatCompletionChunk` (or, after a failure, of"
                        " an `openai.Error`); `[DONE]` last",
                    }
                },
                "required": ["data"],
            }
        },
    }
}

_STRUCT_BODIES = {
    (OPENAI_SERVICE, "CreateChatCompletion"): ".chatmesh.openai.v1.CreateChatCompletionRequest",
}
"""Methods whose body travels as a google.protobuf.Struct, read into the message named here by the
service (which rejects the fields that message lacks): the body's schema is that message's."""

_ERRORS = {
    "400": "invalid argument (the field is named in the details)",
    "401": "missing or invalid bearer token",
    "404": "not found (another user's chat is not found either)",
    "413": "the request body is larger than the gateway takes (`CHATMESH_GATEWAY_MAX_REQUEST_BYTES`)",
    "429": "rate-limited or the engine is full: retry after the `retry-after-ms` header",
    "503": "a dependency is unavailable: retry",
}


# The limits the chat service enforces (chat_service/validation.py, chat_service/openai_api.py), written
# into the request schemas so that clients, and the fuzzing that reads this document, know them; a
# unit test holds these numbers to the service's own. A request outside them is a 400 naming the field.
MAX_CONTENT_CHARS = 32_000
MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 8_000
MAX_REQUEST_ID_CHARS = 128
MAX_CHATS_PAGE = 100
MAX_MESSAGES_PAGE = 200
_NOT_BLANK = r"\S"
"""Holds a character other than white space (patterns are not anchored)."""
_SAMPLING: dict[str, dict[str, Any]] = {
    # The upper bound of max_tokens is the served model's context length, which the document cannot know.
    "max_tokens": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
}
_COMPLETION_FIELDS: dict[str, dict[str, Any]] = {
    "content": {"minLength": 1, "maxLength": MAX_CONTENT_CHARS, "pattern": _NOT_BLANK},
    "request_id": {"maxLength": MAX_REQUEST_ID_CHARS},
    **_SAMPLING,
}
_CHAT_FIELDS: dict[str, dict[str, Any]] = {
    "title": {"maxLength": MAX_TITLE_CHARS},
    "system_prompt": {"maxLength": MAX_SYSTEM_PROMPT_CHARS},
}
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type"],
}
FIELD_CONSTRAINTS: dict[str, dict[str, dict[str, Any]]] = {
    ".chatmesh.chat.v1.CreateChatRequest": {
        **_CHAT_FIELDS,
        # Optional: empty starts a chat without a question.
        "content": {"maxLength": MAX_CONTENT_CHARS, "pattern": f"^$|{_NOT_BLANK}"},
        "request_id": {"maxLength": MAX_REQUEST_ID_CHARS},
        **_SAMPLING,
    },
    ".chatmesh.chat.v1.CompleteRequest": _COMPLETION_FIELDS,
    ".chatmesh.chat.v1.SubmitCompletionRequest": _COMPLETION_FIELDS,
    ".chatmesh.chat.v1.UpdateChatRequest": _CHAT_FIELDS,
    ".chatmesh.chat.v1.ListChatsRequest": {"page_size": {"minimum": 0, "maximum": MAX_CHATS_PAGE}},
    ".chatmesh.chat.v1.GetMessagesRequest": {"page_size": {"minimum": 0, "maximum": MAX_MESSAGES_PAGE}},
    ".chatmesh.openai.v1.CreateChatCompletionRequest": {
        "model": {"minLength": 1},
        "messages": {"minItems": 1},
        **_SAMPLING,
        "max_completion_tokens": {"minimum": 1},
        "seed": {"minimum": 0, "pattern": "^[0-9]+$"},
        # What chatmesh cannot honour is accepted only with its neutral value.
        "n": {"const": 1},
        "stop": {"type": "null"},
        "presence_penalty": {"const": 0},
        "frequency_penalty": {"const": 0},
        "logprobs": {"const": False},
    },
    ".chatmesh.openai.v1.ChatMessage": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "oneOf": [
                {"type": "string", "maxLength": MAX_CONTENT_CHARS},
                {"type": "array", "items": _TEXT_PART},
            ]
        },
    },
}
"""Per request message (full name), per field: JSON Schema keywords added to the field's schema."""

_CHAT_ID_TAKERS = ("Complete", "GetMessages", "UpdateChat", "DeleteChat", "SubmitCompletion")
_JOB_ID_TAKERS = ("GetJob", "WatchJob")
_STREAMED_CHAT_ID = '$response.body#/0/data#regex:"chat_id":"([^"]+)"'
"""The chat a completion stream belongs to: the `chat_id` in the `data` of its first event. Standard
runtime expressions cannot reach into an event's JSON; the `#regex:` suffix (one capturing group) is
how Schemathesis, which drives the fuzzing, extracts it, and a tool that does not know it sees a string."""


def _chat_links(expression: str) -> dict[str, dict[str, Any]]:
    return {name: {"operationId": name, "parameters": {"chat_id": expression}} for name in _CHAT_ID_TAKERS}


LINKS: dict[str, dict[str, dict[str, Any]]] = {
    "CreateChat": _chat_links(_STREAMED_CHAT_ID),
    "Complete": _chat_links(_STREAMED_CHAT_ID),
    "ListChats": {
        **_chat_links("$response.body#/chats/0/chat_id"),
        "NextPage": {
            "operationId": "ListChats",
            "parameters": {"page_token": "$response.body#/next_page_token"},
        },
    },
    "GetMessages": {
        "NextPage": {
            "operationId": "GetMessages",
            "parameters": {
                "chat_id": "$request.path.chat_id",
                "page_token": "$response.body#/next_page_token",
            },
        },
    },
    "UpdateChat": _chat_links("$response.body#/chat/chat_id"),
    "SubmitCompletion": {
        **_chat_links("$response.body#/chat_id"),
        **{
            name: {"operationId": name, "parameters": {"job_id": "$response.body#/job_id"}}
            for name in _JOB_ID_TAKERS
        },
    },
    "GetJob": {"WatchJob": {"operationId": "WatchJob", "parameters": {"job_id": "$response.body#/job_id"}}},
}
"""OpenAPI links of each operation's success reply, by operationId: where the ids a reply holds (a new
chat, a job, the next page) can be used next."""

REQUIRED_FIELDS: dict[str, list[str]] = {
    ".chatmesh.chat.v1.CompleteRequest": ["content"],
    ".chatmesh.chat.v1.SubmitCompletionRequest": ["content"],
    ".chatmesh.openai.v1.CreateChatCompletionRequest": ["model", "messages"],
    ".chatmesh.openai.v1.ChatMessage": ["role", "content"],
}
"""Fields a request must set (proto3 has no `required`; the service refuses the request without them)."""


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
    for service in services:
        for method in descriptors[service].method:
            rule = http_rule(method.options)
            info = next(m for m in api.methods if m.service == service and m.name == method.name)
            for binding in info.bindings:
                body = rule.body if binding == info.bindings[0] else ""
                operation = _operation(
                    service, method, binding.template, binding.verb, body, schemas, messages
                )
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
    operation: dict[str, Any] = {
        "operationId": method.name,
        "summary": f"{method.name} ({service}/{method.name} over gRPC)",
    }
    struct_body = _STRUCT_BODIES.get((service, method.name))
    if struct_body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.message(struct_body)}},
        }
    elif body == "*":
        operation["requestBody"] = {
            # The transcoder reads a missing body as an empty message, which is a request when no
            # field is required.
            "required": method.input_type in REQUIRED_FIELDS,
            "content": {
                "application/json": {"schema": schemas.message(method.input_type, frozenset(path_fields))}
            },
        }
    elif body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.field(fields[body], method.input_type)}},
        }
    else:
        for field in request.field:
            if field.name in path_fields or field.type == FieldProto.TYPE_MESSAGE:
                continue
            parameters.append(
                {
                    "name": field.name,
                    "in": "query",
                    "required": False,
                    "schema": schemas.field(field, method.input_type),
                }
            )
    if parameters:
        operation["parameters"] = parameters
    error_schema = "openai.Error" if service == OPENAI_SERVICE else "Error"
    error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}}
    if method.output_type == _HTTP_BODY:
        operation["responses"] = {
            "200": {"description": "OK", "content": _HTTP_BODY_REPLIES[(service, method.name)]},
            **{code: {"description": text, "content": error} for code, text in _ERRORS.items()},
        }
        return operation
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
    operation["responses"] = {
        success: {
            "description": description,
            "content": content,
            **({"links": LINKS[method.name]} if method.name in LINKS else {}),
        },
        **{code: {"description": text, "content": error} for code, text in _ERRORS.items()},
    }
    return operation
