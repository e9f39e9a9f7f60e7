"""The `chatmesh` command line: run the mesh locally and talk to it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import jwt


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


def _token(user: str, ttl_s: float, private_key: str | None, claims: dict[str, Any] | None = None) -> str:
    """A token for `user` (with `claims` added: a group, roles), signed with the key the chat service
    verifies with. The HS256 secret file is read, never created: a new secret would sign a token that no
    running mesh accepts."""
    from chatmesh.common.auth import JwtKeys, issue_token, read_secret
    from chatmesh.common.service_settings import ChatServiceSettings
    from chatmesh.common.settings import env_name

    settings = ChatServiceSettings()
    if private_key:
        public = settings.jwt_public_key_file.read_text() if settings.jwt_public_key_file else ""
        keys = JwtKeys.rs256(
            public,
            Path(private_key).read_text(),
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_clock_skew_s,
        )
    elif settings.jwt_public_key_file is None and not settings.jwt_secret and settings.jwt_secret_file:
        secret = read_secret(settings.jwt_secret_file, env_name(ChatServiceSettings, "jwt_secret_file"))
        keys = JwtKeys.hs256(secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_clock_skew_s)
    else:
        keys = settings.jwt_keys()
    return issue_token(keys, user, ttl_s, claims)


def _keygen(out_dir: Path, hs256: bool, force: bool) -> int:
    from chatmesh.keygen import (
        hs256_instructions,
        rs256_instructions,
        write_hs256_secret,
        write_rs256_key_pair,
    )

    try:
        if hs256:
            print(hs256_instructions(write_hs256_secret(out_dir / "jwt-secret", force)), end="")
        else:
            files = write_rs256_key_pair(out_dir / "jwt-rs256.key", out_dir / "jwt-rs256.pub", force)
            print(rs256_instructions(files), end="")
    except OSError as exc:
        print(f"chatmesh keygen: {exc}", file=sys.stderr)
        return 1
    return 0


def _list_models() -> int:
    """Every catalog model: installed or not, size, licence, prompt format; `*` for those `chatmesh run`
    serves."""
    from chatmesh.mesh import MeshModels, MeshSettings, mesh_models
    from chatmesh.models.catalog import CATALOG
    from chatmesh.models.store import CACHE_DIR_VARIABLE, ModelStore

    store = ModelStore()
    try:
        served: MeshModels | None = mesh_models(MeshSettings())
    except ValueError as exc:
        # The catalog is still worth listing; the setting's error is what `chatmesh run` would say.
        print(f"chatmesh models list: `chatmesh run` would refuse: {exc}", file=sys.stderr)
        served = None
    pulled_by_mesh = [] if served is None else [m.name for m in served.served if m.catalog is not None]
    rows = [("", "NAME", "INSTALLED", "SIZE", "LICENCE", "PROMPT", "DESCRIPTION")]
    for model in CATALOG.values():
        rows.append(
            (
                "*" if model.name in pulled_by_mesh else "",
                model.name,
                "yes" if store.is_pulled(model) else "no",
                f"{model.size / 1e6:,.0f} MB",
                model.licence,
                f"{model.chat_template} template" if model.prompt_format == "template" else "transcript",
                model.description,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]))
    print(f"\nCache: {store.cache_dir} (${CACHE_DIR_VARIABLE} moves it). Pull: chatmesh models pull NAME.")
    if served is not None and served.served:
        print(f"* served by `chatmesh run` ({served.variable}); the default: {served.served[0].name}.")
        for entry in served.served:
            if entry.catalog is None:
                print(f"  also served: {entry.name}, the local file {entry.path}")
    elif served is not None:
        print(f"`chatmesh run` serves the one file {served.variable} names.")
    print("Any local GGUF: CHATMESH_INFERENCE_MODELS=NAME=PATH[,...] (see docs/models.md).")
    return 0


def _pull_models(names: list[str]) -> int:
    """Pull each model named (all names checked first); 1 on an unknown name or a failed pull."""
    from chatmesh.models.catalog import catalog_model
    from chatmesh.models.store import ModelFileError, ModelStore

    try:
        models = [catalog_model(name) for name in names]
    except KeyError as exc:
        print(f"chatmesh models pull: {exc}", file=sys.stderr)
        return 1
    store = ModelStore()
    for model in models:
        try:
            store.pull(model)
        except (ModelFileError, OSError) as exc:
            print(f"chatmesh models pull: {exc}", file=sys.stderr)
            return 1
    return 0


def _model_path(name: str) -> int:
    """Print the path of `name`'s file once verified (for scripts); 1 if unknown or not whole."""
    from chatmesh.models.catalog import catalog_model
    from chatmesh.models.store import ModelFileError, ModelStore

    try:
        print(ModelStore().verified_path(catalog_model(name)))
    except (KeyError, ModelFileError) as exc:
        print(f"chatmesh models path: {exc}", file=sys.stderr)
        return 1
    return 0


def _models(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        return _list_models()
    if args.models_command == "pull":
        return _pull_models(args.names)
    return _model_path(args.name)


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task."""
    parser = argparse.ArgumentParser(prog="chatmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the whole mesh on this machine (Ctrl-C stops it)")
    generate = commands.add_parser("generate", help="stream a reply from the inference service")
    generate.add_argument("prompt")
    generate.add_argument("--address", default="127.0.0.1:50052")
    generate.add_argument("--max-tokens", type=int, default=128)
    token_command = commands.add_parser(
        "token", help="print a JWT for USER (HS256 with the chat secret, or RS256 with --private-key)"
    )
    token_command.add_argument("user")
    token_command.add_argument("--ttl-hours", type=float, default=24 * 30)
    token_command.add_argument(
        "--private-key", help="RS256: PEM private key file from `chatmesh keygen` (default: HS256)"
    )
    token_command.add_argument("--group", help="the user's group (budgets and usage per group)")
    token_command.add_argument(
        "--role", action="append", default=[], help="a role (repeatable); `--role admin` makes an admin"
    )
    token_command.add_argument(
        "--group-claim", default="group", help="the claim the group goes in (CHATMESH_CHAT_JWT_GROUP_CLAIM)"
    )
    token_command.add_argument(
        "--role-claim", default="role", help="the claim the roles go in (CHATMESH_CHAT_JWT_ROLE_CLAIM)"
    )
    keygen = commands.add_parser(
        "keygen",
        help="write an RS256 key pair (or with --hs256 a shared secret) for JWTs",
        description="Write key material for JWTs and print the settings that use it. RS256 (default):"
        " OUT_DIR/jwt-rs256.key (private, mode 600) signs tokens, OUT_DIR/jwt-rs256.pub verifies them"
        " in the chat service and the gateway. --hs256: OUT_DIR/jwt-secret, one shared secret.",
    )
    keygen.add_argument("--out-dir", type=Path, default=Path(".run"), help="default: .run")
    keygen.add_argument("--hs256", action="store_true", help="a shared HS256 secret instead")
    keygen.add_argument("--force", action="store_true", help="replace existing files")
    models = commands.add_parser(
        "models",
        help="the model catalog: list, pull (download, assemble, verify) and find model files",
        description="The catalog's models, pulled once into ~/.cache/chatmesh/models (or"
        " $CHATMESH_MODELS_DIR). Any local GGUF is served without a pull:"
        " CHATMESH_INFERENCE_MODELS=NAME=PATH.",
    )
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="every catalog model: installed or not, size, licence, format")
    pull = models_commands.add_parser(
        "pull", help="download, assemble and verify models' files (a no-op for those already pulled)"
    )
    pull.add_argument("names", nargs="+", metavar="NAME")
    path = models_commands.add_parser("path", help="print the path of a pulled model's file, once verified")
    path.add_argument("name", metavar="NAME")
    chat = commands.add_parser("chat", help="talk to the mesh from the terminal (through the gateway)")
    chat.add_argument("--address", default="127.0.0.1:8080", help="gateway (Envoy) or a chat replica")
    chat.add_argument("--user", default="dev", help="sign a dev token for this user (default: dev)")
    chat.add_argument("--token", help="use this JWT instead of signing one")
    chat.add_argument("--chat", dest="chat_id", help="continue this chat")
    chat.add_argument("-m", "--message", help="send one message, print the reply and exit")
    chat.add_argument("--list", action="store_true", help="list your chats and exit")
    chat.add_argument("--delete", metavar="CHAT_ID", help="delete a chat and exit")
    chat.add_argument(
        "--model", help="the model of new chats, or with --chat switch that chat to it (default: the mesh's)"
    )
    return parser


def _chat(args: argparse.Namespace) -> int:
    from chatmesh.terminal import run_terminal

    try:
        token = args.token or _token(args.user, 3600, None)
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        print(f"chatmesh chat: {exc}, or pass --token", file=sys.stderr)
        return 1
    return asyncio.run(
        run_terminal(
            args.address, token, args.chat_id, args.message, args.list, args.delete, model=args.model
        )
    )


def _print_token(args: argparse.Namespace) -> int:
    try:
        claims: dict[str, Any] = {}
        if args.group is not None:
            claims[args.group_claim] = args.group
        if args.role:
            claims[args.role_claim] = args.role[0] if len(args.role) == 1 else args.role
        print(_token(args.user, args.ttl_hours * 3600, args.private_key, claims))
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        hint = (
            ""
            if args.private_key or isinstance(exc, FileNotFoundError)
            else "; with RS256 keys pass --private-key FILE (chatmesh keygen)"
        )
        print(f"chatmesh token: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chatmesh` console script."""
    args = _parser().parse_args(argv)
    if args.command == "chat":
        return _chat(args)
    if args.command == "token":
        return _print_token(args)
    if args.command == "keygen":
        return _keygen(args.out_dir, args.hs256, args.force)
    if args.command == "models":
        return _models(args)

    if args.command == "run":
        from chatmesh.mesh import MeshSettings, run

        return asyncio.run(run(MeshSettings()))
    return asyncio.run(_generate(args.address, args.prompt, args.max_tokens))


if __name__ == "__main__":
    raise SystemExit(main())
