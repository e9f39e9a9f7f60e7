"""When the Triton backend cancels a generation's stream, and when it reads the stream to its end.

Cancelling a request at the moment it completes is what crashed the suite's Triton (2.51, server#7840:
the cancellation notification and the request's final callback both release the same stream state;
docs/triton-crash.md). The model is given the stop sequences and ends on them itself, so the backend
must not cancel a stream that is ending anyway; it cancels only a model that goes on past a stop, or
when its caller goes away. A fake `ModelStreamInfer` call stands in for Triton: what matters here is the
order of reads and the cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from inference_service.backends.base import Completion, FinishReason, ModelInfo, Prompt, Sampling, TextDelta
from inference_service.backends.triton import TritonBackend
from inference_service.prompt import TEMPLATES
from tests.support.waiting import until


def response(text: str, *, final: bool = False) -> service_pb2.ModelStreamInferResponse:
    """One streamed response: one token of `text`, its `output_length` (so no tokenizer is needed)."""
    message = service_pb2.ModelStreamInferResponse()
    infer = message.infer_response
    infer.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
    infer.outputs.add(name="output_length", datatype="INT32", shape=[1, 1])
    data = text.encode()
    infer.raw_output_contents.append(len(data).to_bytes(4, "little") + data)
    infer.raw_output_contents.append((1).to_bytes(4, "little"))
    if final:
        infer.parameters["triton_final_response"].bool_param = True
    return message


class FakeStreamCall:
    """A ModelStreamInfer call that hands out `responses`, then (unless `ends` is false: a model still
    generating) ends the stream. Records whether it was cancelled before the stream ended."""

    def __init__(self, responses: list[service_pb2.ModelStreamInferResponse], ends: bool = True) -> None:
        self._responses = list(responses)
        self._ends = ends
        self.ended = False
        self.cancelled_before_end = False
        self.read_count = 0

    async def write(self, request: Any) -> None:
        pass

    async def done_writing(self) -> None:
        pass

    async def read(self) -> Any:
        # A turn of the event loop per message, as from a socket: the consumer runs in between.
        await asyncio.sleep(0)
        if self._responses:
            self.read_count += 1
            return self._responses.pop(0)
        if not self._ends:
            await asyncio.Event().wait()  # the model is still generating
        self.ended = True
        return grpc.aio.EOF

    def cancel(self) -> bool:
        if not self.ended:
            self.cancelled_before_end = True
        return True


class FakeStub:
    def __init__(self, call: FakeStreamCall) -> None:
        self.call = call

    def ModelStreamInfer(self, timeout: float) -> FakeStreamCall:  # the gRPC method's name
        return self.call


class CharTokenizer:
    """One id per character: enough to build the request's stop words (the responses count tokens)."""

    prefix: Sequence[int] = ()

    def encode(self, text: str, *, special: bool) -> list[int]:
        return [ord(c) for c in text]


def backend(call: FakeStreamCall) -> TritonBackend:
    """A TritonBackend reading `call`, without a channel."""
    return TritonBackend(
        FakeStub(call),  # type: ignore[arg-type]
        CharTokenizer(),
        TEMPLATES["transcript"],
        url="127.0.0.1:1",
        model="ensemble",
        info=ModelInfo("m", 4096, "triton"),
        timeout_s=30.0,
        end_id=1,
        pad_id=0,
    )


PROMPT = Prompt(text="User: hi\nAssistant:", token_ids=(1, 2, 3), message_tokens=(3,))


def sampling(max_tokens: int = 40) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=(" lazy",), seed=None)


async def generate(triton: TritonBackend, params: Sampling) -> tuple[str, Completion]:
    text = ""
    completion = None
    async for event in triton.generate(PROMPT, params):
        if isinstance(event, TextDelta):
            text += event.text
        else:
            completion = event
    assert isinstance(completion, Completion)
    return text, completion


async def test_a_model_that_ends_on_the_stop_sequence_is_read_to_the_end_not_cancelled() -> None:
    call = FakeStreamCall([response(" the"), response(" fox"), response(" lazy")])
    text, completion = await generate(backend(call), sampling())
    assert text == "the fox"
    assert completion.finish_reason == FinishReason.STOP
    assert completion.completion_tokens == 3
    assert call.ended and not call.cancelled_before_end, "a stream that is ending must not be cancelled"


async def test_a_model_that_goes_on_past_the_stop_sequence_is_cancelled() -> None:
    # TensorRT-LLM matches stop words as tokens and can miss what the relay matches as text.
    call = FakeStreamCall([response(" the"), response(" lazy"), response(" dog")], ends=False)
    text, completion = await asyncio.wait_for(generate(backend(call), sampling()), timeout=10)
    assert text == "the"
    assert completion.finish_reason == FinishReason.STOP
    assert call.cancelled_before_end


async def test_a_model_past_the_stop_sequence_at_its_last_token_is_not_cancelled() -> None:
    # That token was the max_tokens-th: the model is ending its stream anyway.
    call = FakeStreamCall([response(" the"), response(" lazy"), response(" dog")])
    text, completion = await generate(backend(call), sampling(max_tokens=3))
    assert text == "the"
    assert completion.completion_tokens == 3
    assert call.ended and not call.cancelled_before_end


async def test_a_response_flagged_final_is_followed_to_the_end_of_the_stream() -> None:
    # TensorRT-LLM flags its last token final; Triton ends the stream right after.
    call = FakeStreamCall([response(" the"), response(" end", final=True)])
    text, completion = await generate(backend(call), sampling(max_tokens=2))
    assert text == "the end"
    assert completion.finish_reason == FinishReason.LENGTH
    assert call.ended and not call.cancelled_before_end


async def test_a_caller_that_goes_away_cancels_the_stream() -> None:
    call = FakeStreamCall([response(" the"), response(" quick")], ends=False)
    async with aclosing(backend(call).generate(PROMPT, sampling())) as events:
        assert await anext(events) == TextDelta(text="the")
        await until(lambda: call.read_count == 2)
    assert call.cancelled_before_end
