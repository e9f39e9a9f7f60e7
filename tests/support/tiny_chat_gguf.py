"""A tiny instruction-model GGUF written for the chat-template tests: a real file that llama.cpp loads,
with real metadata (a ChatML `tokenizer.chat_template`, a SentencePiece vocabulary, BOS/EOS ids) and
random weights, steered so that its greedy reply is known.

The steering: the attention and feed-forward blocks write nothing back to the residual stream (their
output projections are zero; the rest of their weights are random), so the next token depends on the
current one only. The embeddings and the output matrix then form a chain: after the newline that ends
ChatML's generation cue the model says "Hello", then " world", then `<|im_end|>` (its EOS). After any other
token it says `<|im_end|>` at once, so a prompt that does not end with the template's cue (the plain
transcript's `Assistant:`) gets an empty reply: the reply itself shows which template was used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
REPLY = "Hello world"
"""The model's greedy reply to any conversation rendered with its own template."""

_EMBEDDING = 64
_FEED_FORWARD = 128
_HEADS = 2
_WORDS = ("user", "assistant", "system", "Hello", "\u2581world", "What", "\u2581is", "\u2581the")

# Token types of llama.cpp's vocabulary (gguf.TokenType): written as numbers so the file's layout is
# visible here.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL, _CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [_BYTE] * 256
    # SentencePiece merges two pieces only into a piece of the vocabulary, so every word comes with its
    # prefixes; any other text falls back to byte tokens.
    pieces = dict.fromkeys(
        [chr(code) for code in range(0x21, 0x7F)]
        + ["\u2581"]
        + [word[:end] for word in _WORDS for end in range(2, len(word) + 1)]
    )
    tokens += list(pieces)
    types += [_NORMAL] * len(pieces)
    # Longer pieces first, as SentencePiece scores them.
    scores = [0.0] * (4 + 256) + [float(len(piece)) for piece in pieces]
    return tokens, scores, types


def write_tiny_chat_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny ChatML model to `path` (about 1 MB) and return it."""
    import gguf

    tokens, scores, types = _vocabulary()
    index = {token: number for number, token in enumerate(tokens)}
    rng = np.random.default_rng(seed)

    def noise(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # token -> the token that follows it; each source token gets an embedding direction of its own.
    chain = {"<0x0A>": "Hello", "Hello": "\u2581world", "\u2581world": "<|im_end|>"}
    embeddings = noise(len(tokens), _EMBEDDING)
    output = noise(len(tokens), _EMBEDDING)
    embeddings[:, 0] += 1.0  # every other token: direction 0, followed by <|im_end|>
    output[index["<|im_end|>"], 0] += 20.0
    for direction, (token, following) in enumerate(chain.items(), start=1):
        embeddings[index[token], 0] -= 1.0
        embeddings[index[token], direction] += 1.0
        output[index[following], direction] += 20.0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("chatmesh tiny chat test model")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(512)
    writer.add_embedding_length(_EMBEDDING)
    writer.add_block_count(1)
    writer.add_feed_forward_length(_FEED_FORWARD)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_HEADS)
    writer.add_rope_dimension_count(_EMBEDDING // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(index["<unk>"])
    writer.add_bos_token_id(index["<s>"])
    writer.add_eos_token_id(index["<|im_end|>"])
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    block = "blk.0."
    writer.add_tensor(block + "attn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v"):
        writer.add_tensor(f"{block}{name}.weight", noise(_EMBEDDING, _EMBEDDING))
    writer.add_tensor(block + "attn_output.weight", np.zeros((_EMBEDDING, _EMBEDDING), dtype=np.float32))
    writer.add_tensor(block + "ffn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
    writer.add_tensor(block + "ffn_gate.weight", noise(_FEED_FORWARD, _EMBEDDING))
    writer.add_tensor(block + "ffn_up.weight", noise(_FEED_FORWARD, _EMBEDDING))
    writer.add_tensor(block + "ffn_down.weight", np.zeros((_EMBEDDING, _FEED_FORWARD), dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
