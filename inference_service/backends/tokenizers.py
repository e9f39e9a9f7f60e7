"""Tokenizers and the one way a prompt is tokenized (`tokenize_prompt`), shared by the backends.

llama.cpp tokenizes with the loaded model's vocabulary. Engines that tokenize on their own side (Triton)
still need counts here for the context window and usage, and they must match the engine's, so the same
vocabulary is loaded locally."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from inference_service.backends.base import Prompt
from inference_service.prompt import PromptTemplate, Turn


class Tokenizer(Protocol):
    """Turns text into the token ids the engine would see. Blocking: call it off the event loop."""

    @property
    def prefix(self) -> Sequence[int]:
        """Special tokens the engine puts before a prompt (BOS for most models; may be empty)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` on its own: no special prefix, special-token markup (turn markers) parsed."""
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

    def encode(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=False, special=True))


class HfTokenizer:
    """A Hugging Face `tokenizer.json`, as TensorRT-LLM's preprocessing model uses."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer as _HfTokenizer

        self._tokenizer = _HfTokenizer.from_file(str(tokenizer_json))
        # Some tokenizer.json files carry padding/truncation settings for training batches; either would
        # make the counts wrong (padded to a fixed length, or capped at the model's input size).
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # The tokenizer's post-processor decides which special tokens go around a text (BOS, usually).
        self._prefix = tuple(self._tokenizer.encode("", add_special_tokens=True).ids)

    @property
    def prefix(self) -> Sequence[int]:
        return self._prefix

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


def tokenize_prompt(template: PromptTemplate, turns: Sequence[Turn], tokenizer: Tokenizer) -> Prompt:
    """Render `turns` with `template` and tokenize them the way every backend does: the special prefix,
    then each rendered message tokenized on its own, then the generation cue.

    Message by message, so that no token spans two messages: a message's count is then the same in any
    prompt it appears in, and one CountTokens call tells a caller exactly what any sub-list of the
    messages occupies (the inference API's contract). With turn markers that are special tokens the
    result is the same as tokenizing the whole text; with plain-text markers it differs at most where a
    merge across a message boundary would have happened.

    Blocking (the tokenizer runs here): call it from a worker thread in async code.
    """
    return _tokenize_pieces(template, template.render_messages(turns), tokenizer.encode, tokenizer.prefix)


def _tokenize_pieces(
    template: PromptTemplate,
    pieces: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    prefix: Sequence[int],
) -> Prompt:
    token_ids = list(prefix)
    preamble = list(encode(template.preamble)) if template.preamble else []
    token_ids += preamble
    message_tokens = []
    for piece in pieces:
        ids = encode(piece)
        token_ids += ids
        message_tokens.append(len(ids))
    token_ids += encode(template.generation_cue)
    return Prompt(
        text=template.preamble + "".join(pieces) + template.generation_cue,
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
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self._max_tokens = max_tokens
        self._lock = threading.Lock()

    def get(self, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def put(self, text: str, ids: tuple[int, ...]) -> None:
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

    def _encode_cached(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self._tokenizer.encode(text))
            self._cache.put(text, ids)
        return ids

    async def prompt(self, turns: Sequence[Turn]) -> Prompt:
        """`turns` rendered and tokenized as every backend sends them (`tokenize_prompt`)."""
        pieces = self._template.render_messages(turns)
        uncached = sum(len(piece) for piece in pieces if self._cache.get(piece) is None)
        args = (self._template, pieces, self._encode_cached, self._tokenizer.prefix)
        if uncached <= self.INLINE_CHARS:
            return _tokenize_pieces(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, _tokenize_pieces, *args)

    async def shared_start(self) -> tuple[int, ...]:
        """The token ids every prompt starts with: the tokenizer's prefix, then the template's preamble
        (taken from an empty conversation's prompt, so they are exactly what every prompt carries)."""
        empty = await self.prompt([])
        return tuple(empty.token_ids[: len(self._tokenizer.prefix) + empty.preamble_tokens])

    async def encode(self, text: str) -> list[int]:
        """The token ids of `text` on its own."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._tokenizer.encode, text)

    def close(self, wait: bool = False) -> None:
        """Stop the thread; queued work is cancelled."""
        self._executor.shutdown(wait=wait, cancel_futures=True)


def open_tokenizer(path: Path) -> Tokenizer:
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


def default_tokenizer_path(triton_tokenizer: Path | None, gguf_path: Path | None) -> Path:
    """The tokenizer the settings ask for: explicit path, else the GGUF model's, else the bundled GGUF's."""
    if triton_tokenizer is not None:
        return triton_tokenizer
    if gguf_path is not None:
        return gguf_path
    from inference_service.backends.llama_cpp import bundled_gguf_path

    return bundled_gguf_path()
