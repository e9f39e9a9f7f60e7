"""Tokenizers for engines that tokenize on their own side (Triton): we still need counts for the context
window and usage, and they must match the engine's, so the same vocabulary is loaded here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    """Turns text into the token ids the engine would see."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special prefix (BOS) the engine adds to a prompt."""
        ...


class LlamaVocabTokenizer:
    """The tokenizer stored in a GGUF file, loaded through llama.cpp without the weights."""

    def __init__(self, gguf_path: Path) -> None:
        from llama_cpp import Llama

        # vocab_only skips the tensors: a few hundred ms and a few MB instead of the whole model.
        self._llama: Any = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)

    def encode(self, text: str) -> list[int]:
        """Token ids as llama.cpp tokenizes a prompt: BOS first, special tokens (turn markers) parsed."""
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=True))


class HfTokenizer:
    """A Hugging Face `tokenizer.json`, as TensorRT-LLM's preprocessing model uses."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer as _HfTokenizer

        self._tokenizer = _HfTokenizer.from_file(str(tokenizer_json))
        # Some tokenizer.json files carry padding/truncation settings for training batches; either would
        # make the counts wrong (padded to a fixed length, or capped at the model's input size).
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's own special tokens (its post-processor decides about BOS)."""
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)


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
        return LlamaVocabTokenizer(path)
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
