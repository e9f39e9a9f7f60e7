"""The end and pad ids the Triton backend sends: the tokenizer's end-of-sequence token (a GGUF's, or the
`eos_token` of the tokenizer_config.json beside a tokenizer.json), unless CHATMESH_INFERENCE_TRITON_END_ID
says otherwise; the pad token, else the end id. Without an end id the service refuses to start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_service.backends.tokenizers import open_tokenizer
from inference_service.backends.triton import end_and_pad_ids
from tests.support.tiny_chat_gguf import write_tiny_chat_gguf


def tokenizer_json(directory: Path, config: dict[str, object] | None) -> Path:
    """A byte-level tokenizer.json with `<eos>` and `<pad>` tokens, and `config` as the
    tokenizer_config.json beside it (none if None)."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    hf = HfTokenizer(models.BPE({symbol: index for index, symbol in enumerate(sorted(alphabet))}, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<pad>", "<eos>"])
    path = directory / "tokenizer.json"
    hf.save(str(path))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_a_gguf_gives_its_eos_token_and_pads_with_it_when_it_has_no_pad_token(tmp_path: Path) -> None:
    path = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    tokenizer = open_tokenizer(path)
    eos = tokenizer.encode("<|im_end|>", special=True)  # the tiny model's EOS
    assert len(eos) == 1
    assert end_and_pad_ids(tokenizer, None, path) == (eos[0], eos[0])
    assert end_and_pad_ids(tokenizer, 7, path) == (7, 7), "the setting wins"


@pytest.mark.parametrize(
    "config",
    [
        {"eos_token": "<eos>", "pad_token": "<pad>"},
        # AddedToken objects, as transformers writes them.
        {"eos_token": {"content": "<eos>", "special": True}, "pad_token": {"content": "<pad>"}},
    ],
)
def test_a_tokenizer_json_takes_its_end_and_pad_tokens_from_tokenizer_config(
    tmp_path: Path, config: dict[str, object]
) -> None:
    path = tokenizer_json(tmp_path, config)
    tokenizer = open_tokenizer(path)
    eos, pad = (tokenizer.encode(token, special=True) for token in ("<eos>", "<pad>"))
    assert len(eos) == len(pad) == 1 and eos != pad
    assert end_and_pad_ids(tokenizer, None, path) == (eos[0], pad[0])
    assert end_and_pad_ids(tokenizer, 9, path) == (9, pad[0]), "the setting overrides the end id only"


def test_without_an_end_id_anywhere_startup_fails_naming_the_setting(tmp_path: Path) -> None:
    path = tokenizer_json(tmp_path, None)  # no tokenizer_config.json
    tokenizer = open_tokenizer(path)
    with pytest.raises(ValueError, match="CHATMESH_INFERENCE_TRITON_END_ID"):
        end_and_pad_ids(tokenizer, None, path)
    assert end_and_pad_ids(tokenizer, 3, path) == (3, 3), "the setting is enough; the pad id follows it"
    # A config that names no eos_token (or one the vocabulary lacks) gives no end id either.
    tokenizer_json(tmp_path, {"eos_token": "</s>"})
    with pytest.raises(ValueError, match="CHATMESH_INFERENCE_TRITON_END_ID"):
        end_and_pad_ids(open_tokenizer(path), None, path)
