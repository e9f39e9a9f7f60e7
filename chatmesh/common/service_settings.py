"""The part of each service's settings that another part sets or reads, under the service's own prefix.

`chatmesh run` starts every service with where it listens, logs and serves metrics, and tells the chat
service where the others are; it reads the chat service's JWT settings (for its gateway, the dev sign-in
and the welcome token, as `chatmesh token` does) and the inference service's admission (to size the
gateway's edge limit). Those fields are defined here, in the shared runtime, and each service's settings
extend its class (`chat_service.settings.ChatSettings(ChatServiceSettings)`, ...): the launcher and the
service agree on every name, default and rule, and nothing outside a service imports its modules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from chatmesh.common.auth import DEV_SECRET_FILE
from chatmesh.common.auth_settings import JwtSettings
from chatmesh.common.settings import ServiceSettings


class ChatServiceSettings(ServiceSettings, JwtSettings):
    """The chat service's settings that the launcher sets (its neighbours' addresses, the dev sign-in) or
    reads (the JWT keys), from `CHATMESH_CHAT_*` variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_CHAT_")

    address: str = "127.0.0.1:50051"
    inference_address: str = Field(
        "127.0.0.1:50052",
        description="host:port of the inference service; several replicas comma-separated (a chat's"
        " generations then stick to one replica, for its cached prompt prefix, and fail over to the next)",
    )
    # Semantic cache (the vector service runs in the embedding service's process).
    cache_address: str | None = Field(
        None,
        description="host:port of the vector service (the embedding service); unset switches the"
        " semantic cache off",
    )
    # Asynchronous completions (SubmitCompletion) on NATS JetStream.
    jobs_nats_url: str | None = Field(
        None,
        description="NATS server with JetStream for asynchronous jobs, e.g. nats://127.0.0.1:4222; unset"
        " switches jobs off (SubmitCompletion answers FAILED_PRECONDITION)",
    )
    # Identity: the JWT_* settings of `JwtSettings`, which the gateway shares. The dev sign-in is the chat
    # service's own: it signs tokens, which needs the secret the mesh made itself.
    dev_sign_in: bool = Field(
        False,
        description="serve POST /dev/sign-in (a token for any user name, for the web page of `make run`);"
        " only with the mesh's own dev secret, never with a configured key",
    )

    @property
    def inference_addresses(self) -> list[str]:
        """Every inference replica named in `inference_address`."""
        return [address.strip() for address in self.inference_address.split(",") if address.strip()]

    @model_validator(mode="after")
    def _dev_sign_in_only_with_the_dev_secret(self) -> ChatServiceSettings:
        if self.dev_sign_in and not self.uses_dev_secret():
            raise ValueError(
                "CHATMESH_CHAT_DEV_SIGN_IN=true hands out tokens without a password, so it runs only with the"
                f" mesh's own dev secret ({DEV_SECRET_FILE}, the default); with a configured key (JWT_SECRET,"
                " another JWT_SECRET_FILE or JWT_PUBLIC_KEY_FILE) users sign in at your identity provider:"
                " unset CHATMESH_CHAT_DEV_SIGN_IN"
            )
        return self


class InferenceServiceSettings(ServiceSettings):
    """The inference service's settings that the launcher sets (where it listens) or reads (how many
    generations it holds), from `CHATMESH_INFERENCE_*` variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_INFERENCE_")

    address: str = "127.0.0.1:50052"
    backend: Literal["llama_cpp", "llama_server", "triton"] = Field(
        "llama_server",
        description="llama_server: llama.cpp's own server, many streams batched together (the default);"
        " llama_cpp: llama-cpp-python in process, one model instance per concurrent generation; triton:"
        " TensorRT-LLM on a Triton server (GPU)",
    )

    # Admission control: at most `max_concurrent` generations run; `max_queue` more may wait.
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="generations at once; default 1 for llama_cpp (one model instance each), 8 for"
        " llama_server (its slots, batched together), 8 for triton",
    )
    max_queue: int = Field(8, ge=0)
    models: str = Field(
        "",
        description="the models to serve, comma-separated, the default first: catalog names (`chatmesh"
        " models list`) or NAME=PATH for a local GGUF; empty: GGUF_PATH under MODEL_NAME when set, else the"
        " catalog's default model",
    )

    @property
    def concurrency(self) -> int:
        """`max_concurrent`, or the backend's default."""
        if self.max_concurrent is not None:
            return self.max_concurrent
        return 1 if self.backend == "llama_cpp" else 8


class EmbeddingServiceSettings(ServiceSettings):
    """The embedding service's settings that the launcher sets (where it listens), from
    `CHATMESH_EMBEDDING_*` variables."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_EMBEDDING_")

    address: str = "127.0.0.1:50053"
