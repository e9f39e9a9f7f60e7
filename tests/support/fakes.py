"""In-memory stand-ins for what the chat service's conversation logic talks to, for unit tests:

- `MemoryDatabase`, `MemoryConversationStore`, `MemoryJobStore` (from tests/support/memory_store.py):
  the `ConversationStore` and `JobStore` contracts in dicts; several stores (replicas) may share one
  database, whose `log` notes every write.
- `MemoryVectors`: the `VectorClient` the semantic cache's policy searches, with exact-text "embeddings"
  (a point matches a search with score 1.0 when its text is the query).
- `FakeEngine`: the `InferenceClient`, serving one model or several (`models`), streaming a scripted
  reply piece by piece; it can fail, or hold a stream open until the test lets it go (`hold_after`,
  `release`).

They are fakes for unit tests only: the real stores, index and engines are tested in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from chat_service.domain import FinishReason
from chat_service.inference import (
    EngineInfo,
    Generated,
    InferenceClient,
    PromptMessage,
    SamplingOptions,
    ServedModels,
    TokenCounts,
)
from chatmesh.common.errors import ChatmeshError, NotFound
from chatmesh.vectors.client import Hit, NewPoint, VectorClient, Where
from chatmesh.vectors.values import Range
from tests.support.memory_store import MemoryConversationStore, MemoryDatabase, MemoryJobStore

__all__ = [
    "FakeEngine",
    "GenerateCall",
    "MemoryConversationStore",
    "MemoryDatabase",
    "MemoryJobStore",
    "MemoryVectors",
]


class MemoryVectors(VectorClient):
    """`VectorClient` in a dict. Exact-text "embedding": a point matches a search with score 1.0 when
    its text is the query; filters are applied as the vector service applies them."""

    def __init__(self) -> None:
        self.points: dict[str, NewPoint] = {}
        self.searches: list[Where] = []
        self.stored = asyncio.Event()
        """Set once a point has been stored (cache writes run after their answer was sent)."""
        self.fail: Exception | None = None
        """Raised by every search while set (an index outage)."""
        self.delay_s = 0.0
        """How long every search takes (a slow index, past the lookup deadline)."""

    @staticmethod
    def _passes(point: NewPoint, where: Where) -> bool:
        for key, match in where.items():
            value = point.payload.get(key)
            if isinstance(match, Range):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    return False
                if match.gt is not None and not value > match.gt:
                    return False
                if match.lte is not None and not value <= match.lte:
                    return False
            elif value != match:
                return False
        return True

    async def search(
        self,
        collection: str,
        text: str,
        *,
        where: Where | None = None,
        limit: int = 5,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        self.searches.append(where or {})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise self.fail
        return [
            Hit(str(point.id), 1.0, dict(point.payload))
            for point in self.points.values()
            if point.text == text and self._passes(point, where or {})
        ][:limit]

    async def upsert(self, collection: str, points: Sequence[NewPoint]) -> int:
        for point in points:
            self.points[str(point.id)] = point
        self.stored.set()
        return len(points)

    async def delete(self, collection: str, where: Where) -> int:
        doomed = [key for key, point in self.points.items() if self._passes(point, where)]
        for key in doomed:
            del self.points[key]
        return len(doomed)


@dataclass(frozen=True)
class GenerateCall:
    """One `generate` call the engine received."""

    messages: tuple[PromptMessage, ...]
    sampling: SamplingOptions
    request_id: str
    model: str = ""
    """The served model it was for (resolved: never "")."""


class FakeEngine(InferenceClient):
    """An inference service that answers every prompt with `reply`, one piece per event, then `Generated`.

    It serves `models` (the default first; by default one, `info`): a call names one of them ("" the
    default), and one it does not serve is `NotFound`, as the real service's. `replies` overrides the
    reply per model. Each model "tokenizes" differently: `token_factor[model]` tokens per word (1 by
    default), so a test can tell whose count it got.

    - `fail` (with `fail_after` pieces sent first): the stream raises it there; before the first piece,
      the call fails before the stream starts.
    - `hold_after`: after that many pieces, the stream waits for `release` (`holding` is set while a
      stream waits there), so a test can act while a generation runs.
    - `calls` lists what it was asked; `closed` the request ids of streams closed before their end
      (a cancelled generation), `finished` those that ran to the end.
    """

    def __init__(
        self,
        reply: Sequence[str] = ("Hello", ",", " world", "."),
        info: EngineInfo | None = None,
        *,
        models: Sequence[EngineInfo] | None = None,
    ) -> None:
        self.served = ServedModels(models or [info or EngineInfo("fake-model", 4096, 32)])
        self.info = self.served.default
        self.reply = list(reply)
        self.replies: dict[str, list[str]] = {}
        self.token_factor: dict[str, int] = {}
        self.fail: ChatmeshError | None = None
        self.fail_after = 0
        self.hold_after: int | None = None
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.calls: list[GenerateCall] = []
        self.counted: list[tuple[PromptMessage, ...]] = []
        self.counted_for: list[str] = []
        """The model of each count, in order (beside `counted`)."""
        self.closed: list[str] = []
        self.finished: list[str] = []

    async def list_models(self) -> Sequence[EngineInfo]:
        return self.served.all

    async def model_info(self, model: str = "") -> EngineInfo:
        return self.served.resolve(model)

    def _served(self, model: str) -> str:
        try:
            return self.served.resolve(model).model
        except NotFound as exc:
            raise NotFound(f"the fake inference service serves no model {model!r}") from exc

    def _tokens(self, message: PromptMessage, model: str) -> int:
        return 3 + self.token_factor.get(model, 1) * len(message.content.split())

    async def count_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> int:
        name = self._served(model)
        self.counted.append(tuple(messages))
        self.counted_for.append(name)
        return 1 + sum(self._tokens(m, name) for m in messages)

    async def count_message_tokens(self, messages: Sequence[PromptMessage], *, model: str) -> TokenCounts:
        name = self._served(model)
        each = tuple(self._tokens(m, name) for m in messages)
        return TokenCounts(1 + sum(each), each, 1)

    async def generate(
        self,
        messages: Sequence[PromptMessage],
        sampling: SamplingOptions,
        request_id: str,
        *,
        model: str,
        affinity: str | None = None,
    ) -> AsyncGenerator[str | Generated, None]:
        name = self._served(model)
        self.calls.append(GenerateCall(tuple(messages), sampling, request_id, name))
        sent = 0
        try:
            for piece in self.replies.get(name, self.reply):
                # Each piece in a pass of the event loop of its own, as it would come off the network.
                await asyncio.sleep(0)
                if self.fail is not None and sent == self.fail_after:
                    raise self.fail
                if self.hold_after is not None and sent == self.hold_after:
                    self.holding.set()
                    await self.release.wait()
                yield piece
                sent += 1
            if self.fail is not None and sent == self.fail_after:
                raise self.fail
            prompt_tokens = await self.count_tokens(messages, model=name)
            self.counted.pop()
            self.counted_for.pop()
            yield Generated(FinishReason.STOP, prompt_tokens, sent)
        except GeneratorExit:
            self.closed.append(request_id)
            raise
        except asyncio.CancelledError:
            self.closed.append(request_id)
            raise
        self.finished.append(request_id)
