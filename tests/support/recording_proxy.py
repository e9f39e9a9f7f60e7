"""A pass-through InferenceService that records what the engine was asked.

The chat service under test talks to this proxy, which forwards every call unchanged to the real
inference service and keeps the requests, so tests can assert on the exact prompts the engine got.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc

_WAIT_LIMIT_S = 120.0


class RecordingInferenceProxy(inference_pb2_grpc.InferenceServiceServicer):
    """Forwards to `upstream` and records Generate and CountTokens requests."""

    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self._upstream = inference_pb2_grpc.InferenceServiceStub(upstream)
        self.generate_requests: list[pb.GenerateRequest] = []
        self.count_requests: list[pb.CountTokensRequest] = []
        # Request ids of the Generate calls that ended (finished, failed, or cancelled by the caller).
        self.ended_generates: list[str] = []
        # The proxy records on its own thread; tests wait on this for what they expect to be recorded.
        self._recorded = threading.Condition()

    def clear(self) -> None:
        with self._recorded:
            self.generate_requests.clear()
            self.count_requests.clear()
            self.ended_generates.clear()

    def _record(self, update: Callable[[], None]) -> None:
        with self._recorded:
            update()
            self._recorded.notify_all()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` (about what was recorded) holds, without blocking the caller's event
        loop. The limit only keeps a broken test from hanging (and the waiting thread from outliving it)."""

        def wait() -> bool:
            with self._recorded:
                return self._recorded.wait_for(condition, _WAIT_LIMIT_S)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(
                f"the inference proxy did not record what the test waited for in {_WAIT_LIMIT_S} s"
            )

    def summary_requests(self) -> list[pb.GenerateRequest]:
        """Generate calls made to summarise history (the chat service tags their request ids)."""
        return [r for r in self.generate_requests if r.request_id.endswith(":summary")]

    def chat_requests(self) -> list[pb.GenerateRequest]:
        """Generate calls that produced a reply for the user."""
        return [r for r in self.generate_requests if not r.request_id.endswith(":summary")]

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self._record(lambda: self.generate_requests.append(request))
        call = self._upstream.Generate(request)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()
            self._record(lambda: self.ended_generates.append(request.request_id))

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CountTokensResponse:
        self._record(lambda: self.count_requests.append(request))
        try:
            reply: pb.CountTokensResponse = await self._upstream.CountTokens(request)
            return reply
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        reply: pb.GetModelInfoResponse = await self._upstream.GetModelInfo(request)
        return reply

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        reply: pb.ListModelsResponse = await self._upstream.ListModels(request)
        return reply


@contextlib.contextmanager
def run_recording_proxy(upstream_address: str) -> Iterator[tuple[str, RecordingInferenceProxy]]:
    """Serve a `RecordingInferenceProxy` for `upstream_address` on a free port, on its own thread.

    Its own thread and event loop keep it answering while the test's loop is blocked (e.g. a fixture
    waiting for a service subprocess to come up). Yields (address, recorder).
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="recording-proxy", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, grpc.aio.Channel, RecordingInferenceProxy, int]:
        channel = grpc.aio.insecure_channel(upstream_address)
        recorder = RecordingInferenceProxy(channel)
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, channel, recorder, port

    server, channel, recorder, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:

        async def stop() -> None:
            await server.stop(None)
            await channel.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
