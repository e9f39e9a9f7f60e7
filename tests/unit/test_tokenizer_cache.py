"""TokenizerThread's cache of tokenized messages: a chat's next turn tokenizes only its new message, and
the prompt is exactly what `tokenize_prompt` gives without a cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from inference_service.backends.tokenizers import TokenizerThread, tokenize_prompt
from inference_service.prompt import FEW_SHOT_PREAMBLE, TEMPLATES, Role, Turn


class CountingTokenizer:
    """One id per character: deterministic, and records every text it is asked to encode."""

    prefix: Sequence[int] = (2,)

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str, *, special: bool) -> list[int]:
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


async def test_a_preamble_is_template_text_tokenized_once() -> None:
    tokenizer = CountingTokenizer()
    template = dataclasses.replace(TEMPLATES["transcript"], preamble=FEW_SHOT_PREAMBLE)
    thread = TokenizerThread(tokenizer, template)
    try:
        first = await thread.prompt(HISTORY)
        tokenizer.encoded.clear()
        second = await thread.prompt([*HISTORY, Turn(Role.USER, "And of Italy?")])
    finally:
        thread.close()
    assert FEW_SHOT_PREAMBLE not in tokenizer.encoded, "cached like the messages"
    for prompt in (first, second):
        assert prompt.text.startswith(FEW_SHOT_PREAMBLE)
        assert prompt.preamble_tokens == len(FEW_SHOT_PREAMBLE)  # one id per character here
        assert list(prompt.token_ids[1 : 1 + prompt.preamble_tokens]) == [ord(c) for c in FEW_SHOT_PREAMBLE]
        # Counted where a caller fitting a context window looks: tokens that belong to no message.
        cue = len(template.generation_cue)
        assert prompt.template_tokens == 1 + prompt.preamble_tokens + cue
    assert first == tokenize_prompt(template, HISTORY, CountingTokenizer())


def test_the_few_shot_preamble_is_for_the_transcript_template_only() -> None:
    import pydantic

    from inference_service.settings import InferenceSettings

    assert (
        InferenceSettings(prompt_preamble="few-shot", prompt_template="transcript").prompt_preamble
        == "few-shot"
    )
    with pytest.raises(pydantic.ValidationError, match="written for the transcript template"):
        InferenceSettings(prompt_preamble="few-shot", prompt_template="gemma")


def test_the_few_shot_preamble_is_the_default_for_the_transcript(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_service.settings import InferenceSettings

    monkeypatch.delenv("CHATMESH_INFERENCE_PROMPT_PREAMBLE", raising=False)
    monkeypatch.delenv("CHATMESH_INFERENCE_PROMPT_TEMPLATE", raising=False)
    assert InferenceSettings().prompt_preamble == "few-shot"
    assert InferenceSettings(prompt_template="chatml").prompt_preamble == "none"
