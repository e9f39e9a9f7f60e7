"""The `chatmesh` command line: run the mesh locally and talk to it."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc


async def _generate(address: str, prompt: str, max_tokens: int) -> int:
    from chatmesh.inference.v1 import inference_pb2 as pb
    from chatmesh.inference.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, content=prompt)],
            sampling=pb.SamplingParams(max_tokens=max_tokens),
        )
        try:
            async for event in stub.Generate(request):
                if event.HasField("delta"):
                    print(event.delta.text, end="", flush=True)
                else:
                    usage = event.finished.usage
                    reason = pb.FinishReason.Name(event.finished.finish_reason)
                    print(f"\n[{reason}, {usage.prompt_tokens} prompt + {usage.completion_tokens} tokens]")
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chatmesh` console script."""
    parser = argparse.ArgumentParser(prog="chatmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the whole mesh on this machine (Ctrl-C stops it)")
    generate = commands.add_parser("generate", help="stream a reply from the inference service")
    generate.add_argument("prompt")
    generate.add_argument("--address", default="127.0.0.1:50052")
    generate.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    if args.command == "run":
        from chatmesh.mesh import MeshSettings, run

        return asyncio.run(run(MeshSettings()))
    return asyncio.run(_generate(args.address, args.prompt, args.max_tokens))


if __name__ == "__main__":
    raise SystemExit(main())
