"""Every seed of the contract's uint64 range makes sampling reproducible on both llama.cpp backends (the
real inference service, the bundled model), the largest ones included: llama.cpp keeps 32 bits of a seed
and reads 0xFFFFFFFF as "random", which 2^32 - 1 and 2^64 - 1 used to hit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from tests.support.services import PARIS
from tests.support.stack import inference_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["llama_server", "llama_cpp"])
def address(request: pytest.FixtureRequest) -> Iterator[str]:
    with inference_service(standard=False, backend=request.param, context_length=512) as service:
        yield service.address


@pytest.fixture
async def stub(address: str) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def sample(stub: inference_pb2_grpc.InferenceServiceStub, seed: int) -> str:
    """A reply sampled hot (temperature 2: without the seed, runs all but never agree)."""
    sampling = pb.SamplingParams(max_tokens=16, temperature=2.0, seed=seed)
    events = stub.Generate(pb.GenerateRequest(messages=PARIS, sampling=sampling))
    return "".join([event.delta.text async for event in events if event.HasField("delta")])


@pytest.mark.parametrize("seed", [7, 2**32 - 1, 2**63, 2**64 - 1])
async def test_the_same_seed_gives_the_same_reply(
    stub: inference_pb2_grpc.InferenceServiceStub, seed: int
) -> None:
    replies = [await sample(stub, seed) for _ in range(3)]
    assert len(set(replies)) == 1, replies
