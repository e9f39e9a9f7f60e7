"""The Triton backend's request (the prompt's token ids, the stop words in TensorRT-LLM's word-list format)
and its reading of a response's raw output bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc.aio as triton_grpc

from inference_service.backends.base import ModelInfo, Prompt, Sampling
from inference_service.backends.tokenizers import tokenize_prompt
from inference_service.backends.triton import TritonBackend, _bytes_elements
from inference_service.prompt import TEMPLATES, Role, Turn

END_OF_TURN = 106


class MarkupTokenizer:
    """One id per character (its code point), and `<end_of_turn>` its one special id where special-token
    markup is parsed. Records the stops it encodes."""

    prefix: Sequence[int] = (2,)

    def __init__(self) -> None:
        self.encoded: list[tuple[str, bool]] = []

    def encode(self, text: str, *, special: bool) -> list[int]:
        self.encoded.append((text, special))
        if not special:
            return [ord(c) for c in text]
        ids: list[int] = []
        for index, part in enumerate(text.split("<end_of_turn>")):
            ids += [END_OF_TURN] if index else []
            ids += [ord(c) for c in part]
        return ids


def backend(tokenizer: MarkupTokenizer, end_id: int = 1, pad_id: int = 0) -> TritonBackend:
    """A TritonBackend that only builds requests (no channel: nothing is sent)."""
    return TritonBackend(
        None,  # type: ignore[arg-type]
        tokenizer,
        TEMPLATES["transcript"],
        url="127.0.0.1:1",
        model="ensemble",
        info=ModelInfo("m", 4096, "triton"),
        timeout_s=30.0,
        end_id=end_id,
        pad_id=pad_id,
    )


def tensors(request: object) -> dict[str, tuple[object, bytes]]:
    return {
        tensor.name: (tensor, raw)
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)  # type: ignore[attr-defined]
    }


def assert_sent_as(
    built: dict[str, tuple[object, bytes]], expected: dict[str, tuple[npt.NDArray[Any], str]]
) -> None:
    """Each tensor is what tritonclient's own numpy path (what `stream_infer` would send) makes of the
    expected array: the same wire bytes, shape and datatype."""
    assert set(built) == set(expected)
    for name, (array, datatype) in expected.items():
        reference = triton_grpc.InferInput(name, list(array.shape), datatype)
        reference.set_data_from_numpy(array)
        tensor, raw = built[name]
        assert raw == reference._get_content(), name
        assert tensor == reference._get_tensor(), name


def test_bytes_tensor_elements_are_read_from_the_wire_format() -> None:
    # Triton's BYTES tensor on the wire: each element a 4-byte little-endian length, then its bytes.
    elements = [b"", b" Paris", "é".encode(), b"x" * 300]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    assert _bytes_elements(raw) == elements
    assert _bytes_elements(b"") == []


def test_the_prompt_goes_as_its_token_ids_with_the_stop_words_as_a_word_list() -> None:
    tokenizer = MarkupTokenizer()
    triton = backend(tokenizer, end_id=1, pad_id=0)
    # Typed markup in the message is plain text in the prompt's ids (tokenize_prompt), and those ids are
    # what is sent: no text tensor, so nothing re-parses it on the way.
    prompt = tokenize_prompt(TEMPLATES["transcript"], [Turn(Role.USER, "Hi<end_of_turn>")], tokenizer)
    assert END_OF_TURN not in prompt.token_ids
    # Stops of different lengths, one a special token and one a single character.
    stops = ("\nUser:", "<end_of_turn>", "é")
    sampling = Sampling(max_tokens=7, temperature=0.0, top_p=0.9, seed=2**40 + 3, stop=stops)

    request = triton._request(prompt, sampling)

    words = [[10, *map(ord, "User:")], [END_OF_TURN], [ord("é")]]
    flat = [token for word in words for token in word]
    ends = [6, 7, 8]
    word_list = np.array([[flat, ends + [-1] * (len(flat) - len(ends))]], dtype=np.int32)
    assert word_list.shape == (1, 2, 8)
    assert request.model_name == "ensemble" and request.id
    assert_sent_as(
        tensors(request),
        {
            "input_ids": (np.array([prompt.token_ids], dtype=np.int32), "INT32"),
            "input_lengths": (np.array([[len(prompt.token_ids)]], dtype=np.int32), "INT32"),
            "max_tokens": (np.array([[7]], dtype=np.int32), "INT32"),
            "end_id": (np.array([[1]], dtype=np.int32), "INT32"),
            "pad_id": (np.array([[0]], dtype=np.int32), "INT32"),
            "stream": (np.array([[True]], dtype=np.bool_), "BOOL"),
            "temperature": (np.array([[1.0]], dtype=np.float32), "FP32"),
            "top_p": (np.array([[0.9]], dtype=np.float32), "FP32"),
            "top_k": (np.array([[1]], dtype=np.int32), "INT32"),
            "random_seed": (np.array([[2**40 + 3]], dtype=np.uint64), "UINT64"),
            "stop_words_list": (word_list, "INT32"),
        },
    )
    # Stops are markup of the operator's or the request's: special tokens parsed.
    assert {(stop, True) for stop in stops} <= set(tokenizer.encoded)


def test_a_sampled_request_without_stops_sends_no_word_list_and_no_top_k() -> None:
    triton = backend(MarkupTokenizer(), end_id=5, pad_id=5)
    prompt = Prompt(text="", token_ids=[2, 300, 70000], message_tokens=(2,))
    sampling = Sampling(max_tokens=3, temperature=0.7, top_p=1.0, seed=None, stop=())
    assert_sent_as(
        tensors(triton._request(prompt, sampling)),
        {
            "input_ids": (np.array([[2, 300, 70000]], dtype=np.int32), "INT32"),
            "input_lengths": (np.array([[3]], dtype=np.int32), "INT32"),
            "max_tokens": (np.array([[3]], dtype=np.int32), "INT32"),
            "end_id": (np.array([[5]], dtype=np.int32), "INT32"),
            "pad_id": (np.array([[5]], dtype=np.int32), "INT32"),
            "stream": (np.array([[True]], dtype=np.bool_), "BOOL"),
            "temperature": (np.array([[0.7]], dtype=np.float32), "FP32"),
            "top_p": (np.array([[1.0]], dtype=np.float32), "FP32"),
        },
    )


def test_the_stop_words_are_tokenized_once_per_set_of_stops() -> None:
    # Every request carries the template's stops: after the first, building the list is a lookup.
    tokenizer = MarkupTokenizer()
    triton = backend(tokenizer)
    prompt = Prompt(text="", token_ids=[2], message_tokens=())
    sampling = Sampling(
        max_tokens=3, temperature=0.0, top_p=1.0, seed=None, stop=("\nUser:", "<end_of_turn>")
    )
    first = tensors(triton._request(prompt, sampling))["stop_words_list"]
    encoded = len(tokenizer.encoded)
    assert tensors(triton._request(prompt, sampling))["stop_words_list"] == first
    assert len(tokenizer.encoded) == encoded


@pytest.mark.parametrize("stops", [("",), ()])
def test_stops_without_tokens_send_no_word_list(stops: tuple[str, ...]) -> None:
    triton = backend(MarkupTokenizer())
    prompt = Prompt(text="", token_ids=[2], message_tokens=())
    sampling = Sampling(max_tokens=3, temperature=0.0, top_p=1.0, seed=None, stop=stops)
    assert "stop_words_list" not in tensors(triton._request(prompt, sampling))
