"""The keyword arguments of the SDK's methods, typed (`Unpack[...]`) and checked at run time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias, TypedDict

from chatmesh.chat.v1 import chat_pb2 as pb

HistoryStrategy: TypeAlias = pb.HistoryStrategy


class SamplingOptions(TypedDict, total=False):
    """The sampling keywords of `stream`, `complete` and `submit_job`; one left out or None takes the
    server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None


class CompletionOptions(SamplingOptions, total=False):
    """Keyword arguments of `stream` and `complete` (see `AsyncChatClient.stream`)."""

    chat_id: str | None
    title: str
    system_prompt: str
    history_strategy: HistoryStrategy
    model: str
    request_id: str | None
    timeout: float | None
    skip_cache: bool


class ChatOptions(TypedDict, total=False):
    """Keyword arguments of `create_chat` (see `AsyncChatClient.create_chat`)."""

    title: str
    system_prompt: str
    history_strategy: HistoryStrategy
    model: str
    request_id: str | None
    timeout: float | None


class UpdateOptions(TypedDict, total=False):
    """Keyword arguments of `update_chat` (see `AsyncChatClient.update_chat`)."""

    title: str | None
    system_prompt: str | None
    history_strategy: HistoryStrategy
    model: str | None
    timeout: float | None


def sampling_fields(options: SamplingOptions) -> dict[str, Any]:
    """The request fields of the sampling knobs that are set (unset ones take the server's default)."""
    given: Mapping[str, object] = options
    return {name: given[name] for name in SamplingOptions.__optional_keys__ if given.get(name) is not None}


def check_keywords(method: str, options: Mapping[str, object], known: frozenset[str]) -> None:
    """Refuse a keyword argument `method` does not take, as Python does for a named parameter (a typo
    would otherwise be ignored without a word)."""
    unknown = sorted(options.keys() - known)
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")
