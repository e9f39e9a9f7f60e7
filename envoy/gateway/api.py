"""The public API as the gateway sees it, read from the descriptor set Envoy transcodes with.

Everything the config needs to know about the public services (their gRPC paths, which methods stream,
the REST paths and verbs of the `google.api.http` rules) comes from `data/chatmesh.pb`, the same file the
`grpc_json_transcoder` loads, so the routes can never disagree with the transcoder or the protos.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

CHAT_SERVICE = "chatmesh.chat.v1.ChatService"
"""The chat API: chats, their history, completions."""

OPENAI_SERVICE = "chatmesh.openai.v1.OpenAIService"
"""The OpenAI-compatible API (`/v1/...`), served by the chat service beside ChatService."""

ACCOUNT_SERVICE = "chatmesh.chat.v1.AccountService"
"""A user's own API keys, usage and budgets (`/keys`, `/usage`)."""

ADMIN_SERVICE = "chatmesh.chat.v1.AdminService"
"""The team's usage, budgets and keys, for admins (`/admin/...`)."""

PUBLIC_SERVICES = (CHAT_SERVICE, OPENAI_SERVICE, ACCOUNT_SERVICE, ADMIN_SERVICE)
"""The services the gateway exposes, all served by the chat replicas."""

DEV_SIGN_IN_SERVICE = "chatmesh.dev.v1.DevSignInService"
"""Tokens without a password for `make run`'s web page: exposed (without a token) only when the gateway's
`dev_sign_in` setting says so, and never described in the OpenAPI document."""

ACCEPTED = frozenset({"SubmitCompletion"})
"""Methods (by name) whose REST success is 202 Accepted, as asynchronous work answers: the gateway's Lua
sets the status (the transcoder can only say 200), and the OpenAPI document says so."""

DESCRIPTOR_RESOURCE = "data/chatmesh.pb"
"""The descriptor set inside this package (written by `tools/protos.py`, shipped as package data)."""

_VERBS = ("get", "put", "post", "delete", "patch")


def default_descriptor_path() -> Path:
    """The descriptor set shipped in this package (`envoy/gateway/data/chatmesh.pb` in the source tree).

    A real file on disk in a source tree and in any pip install (Envoy reads it by path)."""
    resource = importlib.resources.files(__package__ or "gateway").joinpath(DESCRIPTOR_RESOURCE)
    return Path(str(resource))


@dataclass(frozen=True, slots=True)
class RestBinding:
    """One `google.api.http` binding: an HTTP verb on a path template."""

    verb: str  # upper case, e.g. "POST"
    template: str  # e.g. "/chat/{chat_id}/completion"

    @property
    def path_regex(self) -> str:
        """An RE2 regex for the paths the transcoder maps to this template (trailing slash allowed)."""
        return template_regex(self.template)


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of a service."""

    service: str  # e.g. "chatmesh.chat.v1.ChatService"
    name: str  # e.g. "Complete"
    grpc_path: str  # e.g. "/chatmesh.chat.v1.ChatService/Complete"
    streaming: bool  # the request or the reply streams
    bindings: tuple[RestBinding, ...]


@dataclass(frozen=True, slots=True)
class RestPath:
    """A REST path template with every verb some method binds on it (in declaration order)."""

    template: str
    verbs: tuple[str, ...]

    @property
    def path_regex(self) -> str:
        """See `RestBinding.path_regex`."""
        return template_regex(self.template)


@dataclass(frozen=True, slots=True)
class ServiceApi:
    """gRPC services and their REST face, as declared in a descriptor set."""

    services: tuple[str, ...]
    methods: tuple[Method, ...]

    @classmethod
    def load(cls, descriptor_path: Path, services: tuple[str, ...] = PUBLIC_SERVICES) -> ServiceApi:
        """Read `services` from the FileDescriptorSet at `descriptor_path` (`ValueError` if one is absent)."""
        try:
            data = descriptor_path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"descriptor set {descriptor_path} is missing; run `make protos`"
            ) from None
        return cls.parse(descriptor_pb2.FileDescriptorSet.FromString(data), services)

    @classmethod
    def parse(
        cls, files: descriptor_pb2.FileDescriptorSet, services: tuple[str, ...] = PUBLIC_SERVICES
    ) -> ServiceApi:
        """`services` from a parsed FileDescriptorSet, their methods in declaration order."""
        found = {
            f"{file.package}.{candidate.name}" if file.package else candidate.name: candidate
            for file in files.file
            for candidate in file.service
        }
        methods: list[Method] = []
        for service in services:
            if service not in found:
                raise ValueError(f"service {service} is not in the descriptor set; run `make protos`")
            methods += [_method(service, m) for m in found[service].method]
        return cls(tuple(services), tuple(methods))

    @property
    def grpc_prefixes(self) -> tuple[str, ...]:
        """`/<package>.<Service>/` of each service: the path prefix of every gRPC call of it."""
        return tuple(f"/{service}/" for service in self.services)

    @property
    def streaming_methods(self) -> tuple[Method, ...]:
        """Methods whose request or reply streams."""
        return tuple(m for m in self.methods if m.streaming)

    def rest_paths(self) -> tuple[RestPath, ...]:
        """Every REST path template with its verbs, in declaration order."""
        verbs: dict[str, list[str]] = {}
        for binding in self.bindings():
            verbs.setdefault(binding.template, [])
            if binding.verb not in verbs[binding.template]:
                verbs[binding.template].append(binding.verb)
        return tuple(RestPath(template, tuple(v)) for template, v in verbs.items())

    def bindings(self) -> Iterator[RestBinding]:
        """Every REST binding of every method, in declaration order."""
        for method in self.methods:
            yield from method.bindings

    def accepted_bindings(self) -> tuple[RestBinding, ...]:
        """The REST bindings of the `ACCEPTED` methods (answered 202 over REST)."""
        return tuple(b for m in self.methods if m.name in ACCEPTED for b in m.bindings)

    def rest_roots(self, service: str) -> tuple[str, ...]:
        """`/v1/`: the first segment of each REST path of `service`, as a path prefix, each once."""
        roots = (
            f"/{b.template.lstrip('/').split('/')[0]}/"
            for m in self.methods
            if m.service == service
            for b in m.bindings
        )
        return tuple(dict.fromkeys(roots))

    def endpoint_summary(self) -> str:
        """`POST /chat, POST /chat/{chat_id}/completion, ...`: the REST API in one line."""
        return ", ".join(f"{b.verb} {b.template}" for b in self.bindings())


def _method(service: str, method: descriptor_pb2.MethodDescriptorProto) -> Method:
    return Method(
        service=service,
        name=method.name,
        grpc_path=f"/{service}/{method.name}",
        streaming=method.server_streaming or method.client_streaming,
        bindings=tuple(_bindings(http_rule(method.options))),
    )


def http_rule(options: descriptor_pb2.MethodOptions) -> http_pb2.HttpRule:
    """The method's `google.api.http` rule (empty if it has none)."""
    # Parsed again from bytes with the annotation registered, so that the extension is read the same
    # way whether or not the protobuf runtime resolved it while parsing the whole set.
    parsed = descriptor_pb2.MethodOptions.FromString(options.SerializeToString())
    if not parsed.HasExtension(annotations_pb2.http):
        return http_pb2.HttpRule()
    rule: http_pb2.HttpRule = parsed.Extensions[annotations_pb2.http]
    return rule


def _bindings(rule: http_pb2.HttpRule) -> Iterator[RestBinding]:
    pattern = rule.WhichOneof("pattern")
    if pattern in _VERBS:
        yield RestBinding(pattern.upper(), getattr(rule, pattern))
    elif pattern == "custom":
        yield RestBinding(rule.custom.kind.upper(), rule.custom.path)
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


_SEGMENT = r"[^/]+"


def template_regex(template: str) -> str:
    """RE2 regex (anchored) for a `google.api.http` path template.

    `*` and `{var}` / `{var=*}` match one segment, `**` and `{var=**}` any number; a `:verb` suffix is
    literal. Like the transcoder, a trailing slash is accepted.
    """
    segments, verb = template_segments(template)
    body = "/" + "/".join(_wildcard(segment) for segment in segments)
    suffix = re.escape(":" + verb) if verb else ""
    return f"^{body}{suffix}/?$"


def template_segments(template: str) -> tuple[list[str], str]:
    """A `google.api.http` path template as its segments and its `:verb` (or ""): each variable replaced
    by its pattern's segments, so that a segment is `*` (any one segment), `**` (any number) or a literal.
    """
    path, verb = _split_verb(template)
    segments: list[str] = []
    for segment in _segments(path):
        if segment.startswith("{") and segment.endswith("}"):
            _, _, sub = segment[1:-1].partition("=")
            segments.extend((sub or "*").split("/"))
        else:
            segments.append(segment)
    return segments, verb


def _wildcard(segment: str) -> str:
    if segment == "**":
        return ".*"
    if segment == "*":
        return _SEGMENT
    return re.escape(segment)


def _split_verb(template: str) -> tuple[str, str]:
    # A verb is a `:name` after the last segment, outside any `{...}` variable.
    depth, colon = 0, -1
    for index, char in enumerate(template):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0 and char == "/":
            colon = -1
        elif depth == 0 and char == ":":
            colon = index
    if colon < 0:
        return template, ""
    return template[:colon], template[colon + 1 :]


def _segments(path: str) -> Iterator[str]:
    # Split on "/" outside of `{...}` (a variable may hold a multi-segment pattern).
    depth, current = 0, ""
    for char in path.lstrip("/"):
        if char == "/" and depth == 0:
            yield current
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    yield current
