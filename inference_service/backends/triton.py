"""Triton backend: a TensorRT-LLM model (deploy/triton's `ensemble`) on a Triton Inference Server.

Generation streams over Triton's gRPC `ModelStreamInfer`, called through the stub generated from
Triton's protos (shipped in `tritonclient.grpc`) on a grpc.aio channel. The model must be decoupled
(TensorRT-LLM's streaming setup): one request, one response per generated token carrying the new text in
`text_output`. The stub rather than `tritonclient.grpc.aio`'s `stream_infer`: at GPU speed the relay's
work per token shows, and `stream_infer` feeds the call from an async iterator (a task of its own per
generation), rebuilds the request from a dict of `InferInput`s and wraps every response in an
`InferResult`; here the request message is built once from the tensors' wire bytes and each response is
read straight off the message.

How the end of a generation is detected: each generation has its own stream whose request side is closed
right after the one request; Triton ends such a stream once that request is complete (a model that flags
completion with an empty final response, as the Python backend does, needs no request parameter for
this). The stream is read to that end even past a response flagged `triton_final_response` (TensorRT-LLM
flags its last token so), and past a stop sequence the model was told about and ends on itself: a stream
is cancelled only when the caller goes away or the model runs on past a stop sequence (`_cancel_past_stop`),
never while its request is completing, which crashed Triton before 2.54 (docs/triton-crash.md).

The prompt goes to Triton as token ids (`input_ids`), never as text: the model's vocabulary is loaded
here (see `tokenizers.py`) and the prompt is tokenized as every backend does it (`tokenize_prompt`),
each message's text as plain text and only the template's markup with special tokens parsed. A text
prompt would be tokenized by TensorRT-LLM's preprocessing model with the HF tokenizer, which parses
special tokens anywhere in the text: a user who typed the template's turn markers (`<|im_end|>` then
`<|im_start|>system`) would forge turns. The same ids give the counts (context window, usage,
CountTokens), so they are exactly what the engine saw. Stop sequences go as TensorRT-LLM's
`stop_words_list`, each tokenized with special tokens parsed (they come from the operator's template or
the request, and only ever stop a generation: `<end_of_turn>` must be its one special id); the text is
still cut at them here (`StopSequenceFilter`), where token-level matching could miss one.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import struct
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from chatmesh.common.errors import Unavailable
from inference_service.backends.base import Completion, FinishReason, ModelInfo, Prompt, Sampling, TextDelta
from inference_service.backends.coalesce import coalesced
from inference_service.backends.templated import TemplatedBackend
from inference_service.backends.text import LeadingSpaceTrimmer
from inference_service.backends.tokenizers import (
    EngineTokenizer,
    Tokenizer,
    open_tokenizer,
)
from inference_service.prompt import PromptTemplate
from inference_service.settings import InferenceSettings

log = logging.getLogger(__name__)

STARTUP_CHECK_TIMEOUT_S = 10.0
"""How long the liveness and readiness checks at startup may take."""


@dataclass(frozen=True, slots=True)
class TritonTensorNames:
    """Input and output tensor names of the model; the defaults are deploy/triton's ensemble's, which are
    TensorRT-LLM's (its `tensorrt_llm` model's for the token ids)."""

    input_ids: str = "input_ids"
    """The prompt's token ids, INT32 [1, n]."""
    input_lengths: str = "input_lengths"
    max_tokens: str = "max_tokens"
    end_id: str = "end_id"
    pad_id: str = "pad_id"
    stop_words_list: str = "stop_words_list"
    """INT32 [1, 2, n]: row 0 the ids of every stop word one after another, row 1 where each ends (the
    cumulative lengths), padded with -1 to n (TensorRT-LLM's word-list format)."""
    stream: str = "stream"
    temperature: str = "temperature"
    top_p: str = "top_p"
    top_k: str = "top_k"
    random_seed: str = "random_seed"
    text_output: str = "text_output"
    output_length: str = "output_length"
    """Optional output: the tokens a streamed response carries (deploy/triton's ensemble routes it from
    TensorRT-LLM's sequence_length). Without it, usage is estimated."""


class StopSequenceFilter:
    """Cuts streamed text at the first stop sequence.

    Text is released as soon as it can no longer be part of a stop sequence: a tail that might be the
    beginning of one is held back until the next piece decides it. Once a stop sequence is seen, nothing
    at or after it is ever released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return the part that is safe to show."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self._pending = self._pending[:cut], ""
            return released
        keep = self._longest_stop_prefix_suffix()
        released = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return released

    def flush(self) -> str:
        """The generation ended without a stop sequence: release what was held back."""
        released, self._pending = ("" if self.stopped else self._pending), ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:length]):
                    best = length
                    break
        return best


class _EngineCount:
    """The output tokens a generation's responses reported, if any did."""

    def __init__(self) -> None:
        self.tokens: int | None = None

    def add(self, tokens: int | None) -> None:
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens


class TritonBackend(TemplatedBackend):
    """Streams generations from a decoupled TensorRT-LLM-style model on Triton."""

    def __init__(
        self,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        *,
        url: str,
        model: str,
        info: ModelInfo,
        timeout_s: float,
        end_id: int,
        pad_id: int,
        tensors: TritonTensorNames = TritonTensorNames(),
    ) -> None:
        super().__init__(info, template, tokenizer)
        self._stub = stub
        self._tokenizer = tokenizer
        self._end_id = _INT32.pack(end_id)
        self._pad_id = _INT32.pack(pad_id)
        self._stop_words: dict[tuple[str, ...], tuple[bytes, int] | None] = {}
        self._url = url
        self._model = model
        self._timeout_s = timeout_s
        self._tensors = tensors

    def close(self) -> None:
        """Stop the tokenizer thread (the channel to Triton belongs to whoever opened this backend)."""
        self._tokenizer_thread.close()

    async def generate(
        self, prompt: Prompt, sampling: Sampling
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        stops = StopSequenceFilter(sampling.stop)
        trimmer = LeadingSpaceTrimmer()
        received: list[str] = []
        counted = _EngineCount()
        # Tokens that arrive while the previous one is being forwarded go out together (see coalesce.py).
        async with aclosing(coalesced(self._stream_text(prompt, sampling, counted))) as responses:
            async for pieces in responses:
                past_stop = pieces if stops.stopped else []
                if not stops.stopped:
                    # Piece by piece, to see whether anything came after the token that completed a
                    # stop sequence (the model ran past it) or the model ended there.
                    text = ""
                    for index, piece in enumerate(pieces):
                        text += stops.feed(piece)
                        if stops.stopped:
                            past_stop = pieces[index + 1 :]
                            break
                    if text := trimmer.feed(text):
                        yield TextDelta(text=text)
                received.extend(pieces)
                if past_stop and _cancel_past_stop(counted, len(received), sampling):
                    # Leaving the loop closes `responses`, which cancels the Triton request.
                    break
        if text := trimmer.feed(stops.flush()):
            yield TextDelta(text=text)
        if counted.tokens is not None:
            completion_tokens, estimated = counted.tokens, False
        else:
            # The model reports no token counts, so the engine's text is re-tokenized. Re-tokenizing can
            # merge tokens the model produced separately (Gemma has a "\n\n" token, the model may emit
            # "\n" twice); each streamed response is at least one token, so that count is a floor.
            retokenized = len(await self._tokenizer_thread.encode("".join(received)))
            completion_tokens, estimated = max(retokenized, len(received)), True
        finish = (
            FinishReason.LENGTH
            if not stops.stopped and completion_tokens >= sampling.max_tokens
            else FinishReason.STOP
        )
        yield Completion(
            finish_reason=finish,
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=completion_tokens,
            usage_estimated=estimated,
        )

    async def _stream_text(
        self, prompt: Prompt, sampling: Sampling, counted: _EngineCount
    ) -> AsyncGenerator[str, None]:
        """Yield the text of each streamed response ("" for a token that ends mid-character), as the
        engine produced it; add the token counts the responses report to `counted`.

        Closing this generator early cancels the gRPC call (and with it the Triton request) before
        `aclose()` returns.
        """
        request = self._request(prompt, sampling)
        # A token can end inside a multi-byte character; decode across responses.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        call = self._stub.ModelStreamInfer(timeout=self._timeout_s)
        ended = False
        try:
            with triton_errors(self._url, self._model, "generation"):
                await call.write(request)
                # Ending the request side after the one request is what makes Triton end the stream once
                # the request is complete (see the module docstring).
                await call.done_writing()
                # Read to the end even after a response flagged final: Triton ends the stream right
                # after it, and cancelling a request that is completing is what crashes Triton < 2.54.
                while (message := await call.read()) is not grpc.aio.EOF:
                    if message.error_message:
                        raise InferenceServerException(msg=message.error_message)
                    response = message.infer_response
                    outputs, length = self._read_outputs(response)
                    counted.add(length)
                    if outputs is not None:
                        yield "".join(decoder.decode(item) for item in outputs)
                ended = True
        finally:
            if not ended:
                # Closed early (the client went away, or the model ran past a stop sequence): Triton
                # sees the cancellation right away and stops the request.
                call.cancel()

    def _request(self, prompt: Prompt, sampling: Sampling) -> service_pb2.ModelInferRequest:
        """The inference request for `prompt`'s token ids, each input tensor [1, 1] (the ids [1, n], the
        stop words [1, 2, n]) from its wire bytes: what tritonclient's `InferInput.set_data_from_numpy`
        would send, without a numpy array per input (numpy round trips were a visible share of the relay's
        time before the first token)."""
        names = self._tensors
        greedy = sampling.temperature == 0.0
        request = service_pb2.ModelInferRequest(model_name=self._model, id=uuid.uuid4().hex)

        def add(name: str, datatype: str, raw: bytes, shape: tuple[int, ...] = (1, 1)) -> None:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)

        add(names.input_ids, "INT32", _int32_bytes(prompt.token_ids), (1, len(prompt.token_ids)))
        add(names.input_lengths, "INT32", _INT32.pack(len(prompt.token_ids)))
        add(names.max_tokens, "INT32", _INT32.pack(sampling.max_tokens))
        add(names.end_id, "INT32", self._end_id)
        add(names.pad_id, "INT32", self._pad_id)
        add(names.stream, "BOOL", b"\x01")
        # TensorRT-LLM has no "temperature 0": it divides by the temperature (older releases return
        # garbage). Greedy decoding is top_k=1, where the temperature does not matter.
        add(names.temperature, "FP32", _FP32.pack(1.0 if greedy else sampling.temperature))
        add(names.top_p, "FP32", _FP32.pack(sampling.top_p))
        if greedy:
            add(names.top_k, "INT32", _INT32.pack(1))
        if sampling.seed is not None:
            add(names.random_seed, "UINT64", _UINT64.pack(sampling.seed))
        if stop_words := self._stop_words_list(sampling.stop):
            raw, length = stop_words
            add(names.stop_words_list, "INT32", raw, (1, 2, length))
        return request

    def _stop_words_list(self, stops: tuple[str, ...]) -> tuple[bytes, int] | None:
        """`stops` in TensorRT-LLM's word-list format (see `TritonTensorNames.stop_words_list`): its wire
        bytes and its length n; None if no stop has a token.

        Each stop is tokenized with special tokens parsed, so that a template's `<end_of_turn>` is that one
        token: stops come from the operator's template or the request, and they only ever end a
        generation. Cached by the tuple of stops: every request carries the template's, so most requests
        only look them up (a request's own stops are a few short strings, tokenized right here)."""
        if stops in self._stop_words:
            return self._stop_words[stops]
        ids: list[int] = []
        ends: list[int] = []
        for stop in stops:
            ids.extend(self._tokenizer.encode(stop, special=True) if stop else ())
            if len(ids) > (ends[-1] if ends else 0):
                ends.append(len(ids))
        ends.extend([-1] * (len(ids) - len(ends)))
        packed = (_int32_bytes(ids + ends), len(ids)) if ids else None
        if len(self._stop_words) >= _STOP_WORDS_CACHED:
            self._stop_words.clear()
        self._stop_words[stops] = packed
        return packed

    def _read_outputs(self, response: Any) -> tuple[list[bytes] | None, int | None]:
        """The `text_output` elements of a response (None for an empty, final-flag only response) and the
        tokens it says it carries (its `output_length`; None if it does not say), in one pass over its
        outputs: this runs once per token.

        Text is read from the response's raw bytes (each element a 4-byte little-endian length, then the
        bytes) rather than through `as_numpy`, whose object-array round trip cost about a fifth of the
        relay's time per token at GPU speed."""
        text: list[bytes] | None = None
        length: int | None = None
        names = self._tensors
        raw_contents = response.raw_output_contents
        for index, output in enumerate(response.outputs):
            raw = raw_contents[index] if index < len(raw_contents) else None
            if output.name == names.text_output:
                text = _bytes_elements(raw) if raw is not None else list(output.contents.bytes_contents)
            elif output.name == names.output_length:
                if raw is not None:
                    length = _INT32.unpack_from(raw)[0] if len(raw) >= 4 else None
                elif contents := output.contents.int_contents:
                    length = int(contents[0])
        return text, length


def _bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a serialized BYTES tensor (Triton's wire format: length-prefixed, little-endian)."""
    elements = []
    offset = 0
    while offset + 4 <= len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return elements


@contextmanager
def triton_errors(url: str, model: str, action: str) -> Iterator[None]:
    """Turn any tritonclient or gRPC failure inside the block into `Unavailable` naming cause and fix.

    The one place where Triton's errors become domain errors.
    """
    try:
        yield
    except (InferenceServerException, grpc.RpcError) as exc:
        if isinstance(exc, InferenceServerException):
            cause = f"{exc.status() or 'error'}: {exc.message()}"
        elif isinstance(exc, grpc.aio.AioRpcError):
            cause = f"{exc.code().name}: {exc.details()}"
        else:
            cause = str(exc)
        fix = (
            "raise CHATMESH_INFERENCE_TRITON_TIMEOUT_S if generations legitimately take this long"
            if "DEADLINE_EXCEEDED" in cause
            else f"check that tritonserver is running and reachable at {url} (CHATMESH_INFERENCE_TRITON_URL)"
            f" and that model '{model}' is loaded (CHATMESH_INFERENCE_TRITON_MODEL)"
        )
        raise Unavailable(f"Triton at {url} failed during {action} ({cause}); {fix}") from exc


async def check_ready(stub: service_pb2_grpc.GRPCInferenceServiceStub, url: str, model: str) -> None:
    """Fail with `Unavailable` unless the server at `url` is live and `model` is ready."""
    with triton_errors(url, model, "the startup health check"):
        timeout = STARTUP_CHECK_TIMEOUT_S
        live = (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout)).live
        ready = (
            live and (await stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=timeout)).ready
        )
    if not live:
        raise Unavailable(f"Triton at {url} is not live; check the tritonserver log")
    if not ready:
        raise Unavailable(
            f"Triton at {url} is live but model '{model}' is not ready; check the model name"
            " (CHATMESH_INFERENCE_TRITON_MODEL) and the tritonserver log for load errors"
        )


@asynccontextmanager
async def open_triton_backend(
    settings: InferenceSettings,
    template: PromptTemplate,
    model_name: str,
    tokenizer_path: Path,
    tensors: TritonTensorNames = TritonTensorNames(),
) -> AsyncIterator[TritonBackend]:
    """Connect to Triton, check that the model is ready, load the tokenizer (`tokenizer_path`: a HF
    tokenizer.json or a GGUF) and find its end id; close the channel on exit. Clients know the model as
    `model_name`."""
    url, model = settings.triton_url, settings.triton_model
    # Unlimited message sizes, as tritonclient sets them: a long prompt must not hit gRPC's 4 MB default.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await check_ready(stub, url, model)
        path = tokenizer_path
        tokenizer = await asyncio.to_thread(open_tokenizer, path)
        end_id, pad_id = end_and_pad_ids(tokenizer, settings.triton_end_id, path)
        log.info(
            "connected to Triton",
            extra={"url": url, "model": model, "tokenizer": str(path), "end_id": end_id, "pad_id": pad_id},
        )
        with triton_errors(url, model, "reading the model's metadata"):
            metadata = await stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model), timeout=STARTUP_CHECK_TIMEOUT_S
            )
        if tensors.output_length not in {output.name for output in metadata.outputs}:
            log.warning(
                "the model has no '%s' output: completion token counts (usage) will be estimated by"
                " re-tokenizing the generated text (counted in"
                " chatmesh_inference_estimated_usage_generations); route TensorRT-LLM's sequence_length"
                " to the model's outputs for exact counts",
                tensors.output_length,
                extra={"model": model},
            )
        backend = TritonBackend(
            stub,
            tokenizer,
            template,
            url=url,
            model=model,
            info=ModelInfo(model=model_name, context_length=settings.context_length, backend="triton"),
            timeout_s=settings.triton_timeout_s,
            end_id=end_id,
            pad_id=pad_id,
            tensors=tensors,
        )
        try:
            yield backend
        finally:
            backend.close()


def end_and_pad_ids(tokenizer: EngineTokenizer, end_id: int | None, path: Path) -> tuple[int, int]:
    """The end id TensorRT-LLM stops at (the setting, else the tokenizer's end-of-sequence token) and the
    pad id (the tokenizer's pad token, else the end id). Fails without an end id: a generation that
    cannot end on its own would run to max_tokens every time."""
    end = end_id if end_id is not None else tokenizer.end_id
    if end is None:
        raise ValueError(
            f"the tokenizer {path} names no end-of-sequence token; set CHATMESH_INFERENCE_TRITON_END_ID to"
            " the model's end id (TensorRT-LLM's end_id), or put the model's tokenizer_config.json (with"
            " eos_token) beside its tokenizer.json"
        )
    pad = tokenizer.pad_id
    return end, pad if pad is not None else end


_INT32 = struct.Struct("<i")
_FP32 = struct.Struct("<f")
_UINT64 = struct.Struct("<Q")
_STOP_WORDS_CACHED = 256
"""Distinct tuples of stop sequences whose word lists are kept (then the cache starts over)."""


def _int32_bytes(values: Sequence[int]) -> bytes:
    """`values` as an INT32 tensor's wire bytes (little-endian). One `struct.pack` call: 4x faster than
    filling an `array('i')` or a numpy array from the list (about 45 us for 4,000 ids here)."""
    return struct.pack(f"<{len(values)}i", *values)


def _cancel_past_stop(counted: _EngineCount, responses: int, sampling: Sampling) -> bool:
    """Whether to cancel a request whose model sent more after our stop sequence.

    The model is given our stop sequences and ends on the token that completes one (as TensorRT-LLM
    does), so the stream is read on after a stop rather than cancelled: cancelling a request at the moment
    it completes is the race that crashes Triton < 2.54 (server#7840; see docs/triton-crash.md). Only a
    model that went on past the stop (TensorRT-LLM matches stop words as tokens, which can miss text the
    relay matches) has its request cancelled, unless what it sent was its last token anyway.
    """
    generated = counted.tokens if counted.tokens is not None else responses
    return generated < sampling.max_tokens
