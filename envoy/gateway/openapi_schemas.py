"""What the descriptor set cannot say about the REST API, as JSON Schema for the OpenAPI document
(`openapi.py`): the error bodies, the OpenAI-compatible bodies (`google.api.HttpBody` on the wire), the
limits the chat service enforces on fields, the fields a request must set, and the links between
operations."""

from __future__ import annotations

from typing import Any

from gateway.api import OPENAI_SERVICE

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

HTTP_BODY_REPLIES: dict[tuple[str, str], dict[str, Any]] = {
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

STRUCT_BODIES = {
    (OPENAI_SERVICE, "CreateChatCompletion"): ".chatmesh.openai.v1.CreateChatCompletionRequest",
}
"""Methods whose body travels as a google.protobuf.Struct, read into the message named here by the
service (which rejects the fields that message lacks): the body's schema is that message's."""

ERROR_REPLIES = {
    "400": "invalid argument (the field is named in the details)",
    "401": "missing or invalid bearer token",
    "403": "not allowed: an API key used outside its scopes or to manage keys, or an admin method called by"
    " someone who is not an admin",
    "404": "not found (another user's chat is not found either), or a model that is not served (the message"
    " names the ones that are)",
    "413": "the request body is larger than the gateway takes (`CHATMESH_GATEWAY_MAX_REQUEST_BYTES`)",
    "429": "rate-limited, the engine is full, or a token budget is used up (the message names it and its"
    " reset): retry after the `retry-after` (seconds) or `retry-after-ms` header",
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
