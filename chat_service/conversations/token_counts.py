"""The token count of a user message, for the history strategies of later turns. A message is stored before
its count is known (`NOT_COUNTED`: counting is a call to the engine's tokenizer, which no transaction may
wait on); the count runs beside the turn and is recorded with the reply, or when the turn ends without
one (`CompletionLeases.end_unanswered`)."""

from __future__ import annotations

import asyncio

from chat_service.conversations.futures import result_if_done
from chat_service.domain import Message
from chat_service.inference import InferenceClient, PromptMessage
from chat_service.storage.base import NOT_COUNTED


class QuestionTokens:
    """Counts user messages' tokens with the engine's own tokenizer, in the background."""

    def __init__(self, inference: InferenceClient) -> None:
        self._inference = inference

    def start(self, question: Message, model: str) -> asyncio.Future[int] | None:
        """Count the message's tokens for `model` (the one answering it) in the background, unless they
        are already stored. Started once the
        engine has sent its turn's first event: before, it would compete with the prompt for the engine's
        tokenizer on the way to the first token; after, it is done long before the reply ends."""
        if question.token_count != NOT_COUNTED:
            return None
        counting = self._inference.count_tokens([PromptMessage("user", question.content)], model=model)
        return asyncio.ensure_future(counting)

    @staticmethod
    def known(counting: asyncio.Future[int] | None) -> int | None:
        """The count, if it is known by now."""
        return result_if_done(counting)
