"""TokenizerThread's cache of tokenized messages: a chat's next turn tokenizes only its new message, and
the prompt is exactly what `tokenize_prompt` gives without a cache."""

from __future__ import annotations

from collections.abc import Sequence

from inference_service.backends.tokenizers import TokenizerThread, tokenize_prompt
from inference_service.prompt import TEMPLATES, Role, Turn


class CountingTokenizer:
    """One id per character: deterministic, and records every text it is asked to encode."""

    prefix: Sequence[int] = (2,)

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return [ord(c) for c in text]


HISTORY = [
    Turn(Role.SYSTEM, "Be brief."),
    Turn(Role.USER, "What is the capital of France?"),
    Turn(Role.ASSISTANT, "Paris."),
]


async def test_the_next_turn_tokenizes_only_its_new_message() -> None:
    tokenizer = CountingTokenizer()
    template = TEMPLATES["transcript"]
    thread = TokenizerThread(tokenizer, template)
    try:
        first = await thread.prompt(HISTORY)
        tokenizer.encoded.clear()
        turns = [*HISTORY, Turn(Role.USER, "And of Italy?")]
        second = await thread.prompt(turns)
    finally:
        thread.close()
    assert tokenizer.encoded == template.render_messages([Turn(Role.USER, "And of Italy?")])
    assert first == tokenize_prompt(template, HISTORY, CountingTokenizer())
    assert second == tokenize_prompt(template, turns, CountingTokenizer())


async def test_a_long_new_message_gives_the_same_prompt_as_without_a_cache() -> None:
    tokenizer = CountingTokenizer()
    template = TEMPLATES["transcript"]
    thread = TokenizerThread(tokenizer, template, cache_tokens=4096)
    turns = [*HISTORY, Turn(Role.USER, "word " * 400)]  # beyond INLINE_CHARS: tokenized on the thread
    try:
        prompt = await thread.prompt(turns)
    finally:
        thread.close()
    assert prompt == tokenize_prompt(template, turns, CountingTokenizer())
