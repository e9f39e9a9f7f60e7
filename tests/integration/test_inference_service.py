"""The real inference service on the in-process engine (llama-cpp-python, Gemma 3 270M) over gRPC:
streaming, cancel, overload, validation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from itertools import accumulate
from subprocess import Popen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.model_files import bundled_gguf_path
from tests.support.processes import LoggedProcess, free_port, run_service
from tests.support.services import LONG, PARIS, cancel_a_long_generation
from tests.support.stack import inference_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inference_process() -> Iterator[tuple[str, Popen[bytes]]]:
    address = f"127.0.0.1:{free_port()}"
    env = inference_env(
        address,
        # The in-process engine (llama-cpp-python); the llama_server backend has its own module.
        backend="llama_cpp",
        max_concurrent=1,
        max_queue=1,
        context_length=2048,
    )
    with run_service("inference_service", env, address, timeout=60) as process:
        yield address, process
    assert process.returncode == 0, "SIGTERM should shut the service down cleanly"


@pytest.fixture
async def stub(
    inference_process: tuple[str, Popen[bytes]],
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(inference_process[0]) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def collect(
    stub: inference_pb2_grpc.InferenceServiceStub, messages: list[pb.Message], **sampling: object
) -> tuple[list[str], pb.Finished]:
    """Run one generation; return the text of each delta and the finished event."""
    deltas: list[str] = []
    finished: pb.Finished | None = None
    async for event in stub.Generate(
        pb.GenerateRequest(messages=messages, sampling=pb.SamplingParams(**sampling))  # type: ignore[arg-type]
    ):
        assert finished is None, "nothing may follow the finished event"
        if event.HasField("delta"):
            deltas.append(event.delta.text)
        else:
            finished = event.finished
    assert finished is not None, "the stream must end with a finished event"
    return deltas, finished


def token_ends(text: str) -> set[int]:
    """Where each token of `text` ends (byte offsets), as the service's model (the bundled GGUF) splits it."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(bundled_gguf_path()), vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        return set(accumulate(len(vocab.detokenize([token])) for token in ids))
    finally:
        vocab.close()


async def test_health_and_model_info(inference_process: tuple[str, Popen[bytes]]) -> None:
    async with grpc.aio.insecure_channel(inference_process[0]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="chatmesh.inference.v1.InferenceService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.context_length, info.backend) == ("gemma-3-270m", 2048, "llama_cpp")


async def test_generation_streams_token_by_token(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    deltas, finished = await collect(stub, PARIS, max_tokens=40, temperature=0)
    text = "".join(deltas)
    assert "Paris" in text
    assert not text.startswith(" "), "the space after the 'Assistant:' cue is not part of the reply"
    assert len(deltas) >= 3, f"expected several chunks, got {deltas}"
    # Token by token: every delta is whole tokens of the reply, as the engine sampled them (one each,
    # unless the relay fell behind and sent the ones that piled up together), never text cut elsewhere.
    delta_ends = set(accumulate(len(delta.encode()) for delta in deltas))
    assert delta_ends <= token_ends(text), f"deltas {deltas} are not whole tokens of {text!r}"
    # Not buffered: test_cancel_frees_the_slot reads deltas while the engine is still generating.
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    assert finished.usage.completion_tokens >= len(deltas)


async def test_max_tokens_ends_with_length_and_exact_usage(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    _, finished = await collect(stub, LONG, max_tokens=5, temperature=0)
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 5
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=LONG))
    assert finished.usage.prompt_tokens == counted.prompt_tokens > 300


async def test_seed_makes_sampling_reproducible(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    first, _ = await collect(stub, PARIS, max_tokens=20, temperature=1.0, seed=7)
    second, _ = await collect(stub, PARIS, max_tokens=20, temperature=1.0, seed=7)
    assert first == second


async def test_cancel_frees_the_slot(
    stub: inference_pb2_grpc.InferenceServiceStub, inference_process: tuple[str, Popen[bytes]]
) -> None:
    # A cancelled generation still holding the only slot would queue the next request and reject the one
    # after (queue size 1). Both must get through even though the cancelled one had ~390 tokens to go.
    # The service logs the end of a generation as it gives the slot back: wait for that line.
    process = inference_process[1]
    assert isinstance(process, LoggedProcess)
    ended = await cancel_a_long_generation(stub, process, "cancel-frees-the-slot")
    # This also shows the reply streams: its first deltas arrived while the engine was still generating.
    assert ended["outcome"] == "cancelled"
    results = await asyncio.gather(
        collect(stub, PARIS, max_tokens=8, temperature=0), collect(stub, PARIS, max_tokens=8, temperature=0)
    )
    assert all(finished.usage.completion_tokens > 0 for _, finished in results)


async def test_overload_is_resource_exhausted_with_retry_hint(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = pb.GenerateRequest(messages=LONG, sampling=pb.SamplingParams(max_tokens=1000, temperature=0))
    running = stub.Generate(request)
    await running.read()  # holds the only slot
    # Two more: one takes the only queue place and waits, the other is turned away, whichever comes first.
    calls = [stub.Generate(request), stub.Generate(request)]
    reads = {asyncio.ensure_future(call.read()): call for call in calls}
    answered, waiting = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
    assert len(answered) == 1 and len(waiting) == 1, "the queued request waits while the slot is held"
    (rejected_read,), (queued_read,) = answered, waiting
    with pytest.raises(grpc.aio.AioRpcError) as err:
        rejected_read.result()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy" in (err.value.details() or "")
    retry_after = dict(err.value.trailing_metadata() or ())["retry-after-ms"]
    assert int(str(retry_after)) > 0
    running.cancel()
    # The queued request is admitted once the running one is cancelled.
    first = await queued_read
    assert first.HasField("delta")
    reads[queued_read].cancel()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(), "messages"),
        (pb.GenerateRequest(messages=[pb.Message(content="hi")]), "messages[0].role"),
        (pb.GenerateRequest(messages=PARIS, sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
        (
            pb.GenerateRequest(messages=PARIS, sampling=pb.SamplingParams(max_tokens=5000)),
            "sampling.max_tokens",
        ),
        (
            pb.GenerateRequest(messages=PARIS, sampling=pb.SamplingParams(temperature=3)),
            "sampling.temperature",
        ),
        (
            pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="word " * 3000)]),
            "messages",
        ),
    ],
    ids=[
        "no-messages",
        "no-role",
        "zero-max-tokens",
        "max-tokens-over-context",
        "temperature",
        "prompt-too-long",
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: inference_pb2_grpc.InferenceServiceStub, request_: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(request_).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}: ")


async def test_count_tokens_rejects_bad_roles(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    unknown_role = pb.Message()
    unknown_role.role = 9  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CountTokens(pb.CountTokensRequest(messages=[pb.Message(role=pb.ROLE_USER), unknown_role]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].role" in (err.value.details() or "")


async def test_count_tokens_per_message_adds_up_for_any_sub_list(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    conversation = [
        pb.Message(role=pb.ROLE_SYSTEM, content="Be terse. Ünïcödé, emoji 🚀 and <start_of_turn> too."),
        *LONG,
        pb.Message(role=pb.ROLE_ASSISTANT, content="  spaced\n\nout  "),
        pb.Message(role=pb.ROLE_USER, content="And now?\n"),
    ]
    whole = await stub.CountTokens(pb.CountTokensRequest(messages=conversation))
    assert len(whole.message_tokens) == len(conversation)
    assert whole.template_tokens > 0 and all(count > 0 for count in whole.message_tokens)
    assert whole.prompt_tokens == whole.template_tokens + sum(whole.message_tokens)
    # What the window strategy relies on: any sub-list's count follows from the one answer.
    for kept in ([0, 3, 4, 5], [2, 3, 4, 5], [5], [0, 5]):
        part = await stub.CountTokens(pb.CountTokensRequest(messages=[conversation[i] for i in kept]))
        assert list(part.message_tokens) == [whole.message_tokens[i] for i in kept]
        assert part.template_tokens == whole.template_tokens
    # And Generate sees the same prompt.
    _, finished = await collect(stub, conversation, max_tokens=1, temperature=0)
    assert finished.usage.prompt_tokens == whole.prompt_tokens
