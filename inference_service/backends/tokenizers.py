"""Tokenizers and the one way a prompt is tokenized (`tokenize_prompt`), shared by the backends.

llama.cpp tokenizes with the loaded model's vocabulary. Triton's TensorRT-LLM model is sent the token
ids made here (it never parses text for special tokens), with the same vocabulary loaded locally; it
also needs the vocabulary's end and padding ids (`EngineTokenizer`).

A message's text is plain text, whatever it holds: typed `<|im_start|>system` or `<end_of_turn>` stays
those characters, never the template's control tokens, so nobody can forge a turn (and step out of the
operator's system prompt or preamble) by typing markup. Only the template's own markup (turn markers, the
generation cue, the preamble) and the tokenizer's prefix (BOS) are tokenized with special tokens parsed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inference_service.backends.base import Prompt
from inference_service.prompt import PromptTemplate, Turn

Segment = tuple[str, bool]
"""A run of prompt text and whether special-token markup in it is parsed (True only for template text)."""

Encode = Callable[[str, bool], Sequence[int]]
"""`Tokenizer.encode` with `special` passed positionally: what tokenizing a segment needs."""


class Tokenizer(Protocol):
    """Turns text into the token ids the engine would see. Blocking: call it off the event loop."""

    @property
    def prefix(self) -> Sequence[int]:
        """Special tokens the engine puts before a prompt (BOS for most models; may be empty)."""
        ...

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids of `text` on its own, with no special prefix. `special`: special-token markup in the
        text (turn markers) becomes those tokens, for the template's own text only; else all of it is
        plain text, as a message's must be."""
        ...


class EngineTokenizer(Tokenizer, Protocol):
    """A tokenizer for an engine that is sent token ids (Triton): it also says how a sequence ends."""

    @property
    def end_id(self) -> int | None:
        """The end-of-sequence token id, if the vocabulary names one."""
        ...

    @property
    def pad_id(self) -> int | None:
        """The padding token id, if the vocabulary has one."""
        ...


class LlamaTokenizer:
    """The tokenizer stored in a GGUF file, through a llama.cpp `Llama` instance.

    Tokenizing reads only the vocabulary, so it is safe in another thread beside a generation running on
    the same instance.
    """

    def __init__(self, llama: Any) -> None:
        self._llama = llama
        self._prefix = tuple(llama.tokenize(b"", add_bos=True, special=True))

    @classmethod
    def vocab_only(cls, gguf_path: Path) -> LlamaTokenizer:
        """Load only the vocabulary of `gguf_path`: a few hundred ms and a few MB, not the weights."""
        from llama_cpp import Llama

        return cls(Llama(model_path=str(gguf_path), vocab_only=True, verbose=False))

    @property
    def prefix(self) -> Sequence[int]:
        return self._prefix

    def encode(self, text: str, *, special: bool) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=False, special=special))

    @property
    def end_id(self) -> int | None:
        eos = int(self._llama.token_eos())
        return eos if eos >= 0 else None

    @property
    def pad_id(self) -> int | None:
        pad = self._llama.metadata.get("tokenizer.ggml.padding_token_id")
        return int(pad) if pad is not None and int(pad) >= 0 else None


class HfTokenizer:
    """A Hugging Face `tokenizer.json`; the end and padding tokens come from the `tokenizer_config.json`
    beside it (`eos_token`, `pad_token`), if there is one."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer as _HfTokenizer

        self._tokenizer = _HfTokenizer.from_file(str(tokenizer_json))
        # Whether special tokens are parsed is a setting of the tokenizer object, not of a call: it is
        # switched per call, under a lock (the tokenizer thread and the event loop both tokenize).
        self._lock = threading.Lock()
        # Some tokenizer.json files carry padding/truncation settings for training batches; either would
        # make the counts wrong (padded to a fixed length, or capped at the model's input size).
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # The tokenizer's post-processor decides which special tokens go around a text (BOS, usually).
        self._prefix = tuple(self._tokenizer.encode("", add_special_tokens=True).ids)
        config = tokenizer_json.parent / "tokenizer_config.json"
        named = json.loads(config.read_text()) if config.is_file() else {}
        self._end_id = self._token_id(named.get("eos_token"))
        self._pad_id = self._token_id(named.get("pad_token"))

    def _token_id(self, token: object) -> int | None:
        """The id of a token as tokenizer_config.json names it: its text, or an AddedToken's fields."""
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        found: int | None = self._tokenizer.token_to_id(token)
        return found

    @property
    def prefix(self) -> Sequence[int]:
        return self._prefix

    @property
    def end_id(self) -> int | None:
        return self._end_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def encode(self, text: str, *, special: bool) -> list[int]:
        with self._lock:
            self._tokenizer.encode_special_tokens = not special
            try:
                return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
            finally:
                self._tokenizer.encode_special_tokens = False


def tokenize_prompt(template: PromptTemplate, turns: Sequence[Turn], tokenizer: Tokenizer) -> Prompt:
    """Render `turns` with `template` and tokenize them the way every backend does: the special prefix,
    then each message tokenized on its own, then the generation cue.

    Message by message, so that no token spans two messages: a message's count is then the same in any
    prompt it appears in, and one CountTokens call tells a caller exactly what any sub-list of the
    messages occupies (the inference API's contract). With turn markers that are special tokens the
    result is the same as tokenizing the whole text; with plain-text markers it differs at most where a
    merge across a message boundary would have happened. Within a message, the message's text is plain
    text (see `MessageFormat`).

    Blocking (the tokenizer runs here): call it from a worker thread in async code.
    """
    encode = _encoder(tokenizer)
    formats = _Formats(encode)
    return _tokenize_messages(
        template, _messages(template, turns, formats), encode, tokenizer.prefix, template.start_of(turns)
    )


def _encoder(tokenizer: Tokenizer) -> Encode:
    return lambda text, special: tokenizer.encode(text, special=special)


@dataclass(frozen=True, slots=True)
class MessageFormat:
    """A role's format split where special tokens end and the message's plain text begins.

    `opening` and `closing` are the template's markup (tokenized with special tokens parsed); `before`
    and `after` the plain text of the format next to the message's text (`"user\n"` after ChatML's
    `<|im_start|>`), tokenized together with it as one plain run. That is exactly how the tokenizer
    splits a whole rendered message when special tokens are parsed (special tokens first, each run of
    text between them on its own), except that typed markup in the message's text stays text.
    """

    opening: str
    before: str
    after: str
    closing: str

    @classmethod
    def split(cls, format_: str, encode: Encode) -> MessageFormat:
        """Split `format_` (one `{content}` field) with the tokenizer that will tokenize it."""
        marker = "\ue000content\ue000"
        parts = format_.format(content=marker).split(marker)
        if len(parts) != 2:
            raise ValueError(f"a message format must hold {{content}} once, got {format_!r}")
        head, special, before = _split_markup(parts[0], encode)
        after, special_after, tail = _split_markup(parts[1], encode)
        if not special:  # plain text all through: one run with the message
            head, before = "", head
        return cls(opening=head + special, before=before, after=after, closing=special_after + tail)

    def segments(self, content: str) -> list[Segment]:
        """The message with `content` as text runs to tokenize, in order."""
        runs = [(self.opening, True), (self.before + content + self.after, False), (self.closing, True)]
        return [run for run in runs if run[0]]


def _split_markup(text: str, encode: Encode) -> tuple[str, str, str]:
    """`text` (template markup) as (plain text, special-token markup, plain text): the plain ends hold no
    special token and the cuts fall where the tokenizer itself splits the text (no token spans them).
    All plain: (text, "", "")."""
    whole = list(encode(text, True))

    def plain(part: str) -> bool:
        return list(encode(part, True)) == list(encode(part, False))

    def clean(cut: int) -> bool:
        return [*encode(text[:cut], True), *encode(text[cut:], True)] == whole

    if plain(text):
        return text, "", ""
    # The cuts at len(text) and 0 always qualify (nothing plain on that side).
    end = next(cut for cut in range(len(text) + 1) if plain(text[cut:]) and clean(cut))
    start = next(cut for cut in range(len(text), -1, -1) if plain(text[:cut]) and clean(cut))
    if start > end:  # no clean split: keep it all as markup
        return "", text, ""
    return text[:start], text[start:end], text[end:]


class _Formats:
    """Each role format's `MessageFormat`, split on first use (tokenizing short markup a few dozen times)."""

    def __init__(self, encode: Encode) -> None:
        self._encode = encode
        self._split: dict[str, MessageFormat] = {}

    def __getitem__(self, format_: str) -> MessageFormat:
        found = self._split.get(format_)
        if found is None:
            found = self._split[format_] = MessageFormat.split(format_, self._encode)
        return found


def _messages(template: PromptTemplate, turns: Sequence[Turn], formats: _Formats) -> list[list[Segment]]:
    return [formats[template.format_of(turn.role)].segments(template.content_of(turn)) for turn in turns]


def _tokenize_messages(
    template: PromptTemplate,
    messages: Sequence[Sequence[Segment]],
    encode: Encode,
    prefix: Sequence[int],
    start: str,
) -> Prompt:
    """The prompt: `prefix`, then `start` (the template's text before the messages, see
    `PromptTemplate.start_of`: preamble and default system turn, tokenized as markup), then each message
    (`messages`, its text runs), then the generation cue."""
    token_ids = list(prefix)
    # Two pieces, as `start_of` joins them: the preamble's ids stay the same with or without a default
    # system turn after it, so a slot warmed with one start serves both.
    preamble = [
        token
        for piece in (template.preamble, start[len(template.preamble) :])
        if piece
        for token in encode(piece, True)
    ]
    token_ids += preamble
    message_tokens = []
    for segments in messages:
        count = 0
        for text, special in segments:
            ids = encode(text, special)
            token_ids += ids
            count += len(ids)
        message_tokens.append(count)
    token_ids += encode(template.generation_cue, True)
    return Prompt(
        text=start + "".join(text for segments in messages for text, _ in segments) + template.generation_cue,
        token_ids=token_ids,
        message_tokens=message_tokens,
        preamble_tokens=len(preamble),
    )


class _TokenCache:
    """Token ids of recently tokenized texts (rendered messages), least recently used dropped first.

    A chat's next turn resends its whole history, and because messages are tokenized one by one
    (`tokenize_prompt`), each earlier message has the same ids every time: only the new message needs
    the tokenizer. Bounded by the number of cached tokens. Thread-safe (one lock around dict moves).
    """

    def __init__(self, max_tokens: int) -> None:
        self._entries: OrderedDict[Segment, tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self._max_tokens = max_tokens
        self._lock = threading.Lock()

    def get(self, text: Segment) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def put(self, text: Segment, ids: tuple[int, ...]) -> None:
        if len(ids) > self._max_tokens // 8:
            return  # one huge text would flush everything else
        with self._lock:
            if text in self._entries:
                return
            self._entries[text] = ids
            self._tokens += len(ids)
            while self._tokens > self._max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self._tokens -= len(dropped)


class TokenizerThread:
    """A backend's tokenizer, the one thread it runs on, and a cache of tokenized messages.

    Tokenizing a long history (or a reply, for an engine that reports no counts) takes milliseconds: on
    the event loop every stream's next token would wait behind it, and in a generation pool it would wait
    behind generations for seconds. One thread keeps it from taking more than a core from the engine.

    Most of a prompt was tokenized before (the history of a chat's next turn, a shared system prompt or
    preamble), so messages are looked up in a cache first. When what is left is short, it is tokenized
    right here on the event loop (well under a millisecond): while the engine keeps every core busy, a
    hop to the thread and back costs more than that, and requests arriving together would queue behind
    each other on the one thread and miss the engine's next batch.
    """

    INLINE_CHARS = 512
    """Uncached text up to this length is tokenized on the caller's thread."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        name: str = "tokenize",
        cache_tokens: int = 262_144,
    ) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._cache = _TokenCache(cache_tokens)
        self._formats = _Formats(_encoder(tokenizer))

    def _encode_cached(self, text: str, special: bool) -> tuple[int, ...]:
        ids = self._cache.get((text, special))
        if ids is None:
            ids = tuple(self._tokenizer.encode(text, special=special))
            self._cache.put((text, special), ids)
        return ids

    async def prompt(self, turns: Sequence[Turn]) -> Prompt:
        """`turns` rendered and tokenized as every backend sends them (`tokenize_prompt`)."""
        messages = _messages(self._template, turns, self._formats)
        uncached = sum(
            len(run[0]) for segments in messages for run in segments if self._cache.get(run) is None
        )
        start = self._template.start_of(turns)
        args = (self._template, messages, self._encode_cached, self._tokenizer.prefix, start)
        if uncached <= self.INLINE_CHARS:
            return _tokenize_messages(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, _tokenize_messages, *args)

    async def shared_start(self) -> tuple[int, ...]:
        """The token ids every prompt without a system message starts with: the tokenizer's prefix, then
        the template's preamble and default system turn (taken from an empty conversation's prompt, so
        they are exactly what such a prompt carries)."""
        empty = await self.prompt([])
        return tuple(empty.token_ids[: len(self._tokenizer.prefix) + empty.preamble_tokens])

    async def encode(self, text: str) -> list[int]:
        """The token ids of `text` on its own, as the engine's text: generated text, whose special tokens
        (an end-of-turn marker the engine wrote) count as the one token each they were."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._tokenizer.encode(text, special=True)
        )

    def close(self, wait: bool = False) -> None:
        """Stop the thread; queued work is cancelled."""
        self._executor.shutdown(wait=wait, cancel_futures=True)


def open_tokenizer(path: Path) -> EngineTokenizer:
    """Load the tokenizer at `path`: a `.gguf` file, a `tokenizer.json`, or a directory holding one.

    Blocking (reads the file); call it from a worker thread in async code.
    """
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found at {path}; set CHATMESH_INFERENCE_TRITON_TOKENIZER to the model's"
            " tokenizer.json (or its directory) or to a .gguf file with the same vocabulary"
        )
    if path.suffix == ".gguf":
        return LlamaTokenizer.vocab_only(path)
    if path.suffix == ".json":
        return HfTokenizer(path)
    raise ValueError(
        f"cannot tell which tokenizer {path} is; CHATMESH_INFERENCE_TRITON_TOKENIZER must name a .gguf file,"
        " a tokenizer.json, or a directory containing tokenizer.json"
    )
