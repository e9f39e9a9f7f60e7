"""The JWT settings the chat service and the gateway share: one definition of the fields, of the rules
that turn them into keys, and of the clock skew, read under each part's own prefix
(`CHATMESH_CHAT_JWT_SECRET`, `CHATMESH_GATEWAY_JWT_SECRET`, ...).

`chatmesh run` hands the chat service's values to its gateway, so Envoy checks tokens at the edge with the
same keys and leeway as the service behind it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatmesh.common.auth import (
    API_KEY_ISSUER,
    API_KEY_SECRET_FILE,
    DEV_SECRET_FILE,
    JWT_LEEWAY_S,
    JwtKeys,
    load_or_create_secret,
)


class JwtSettings(BaseSettings):
    """Identity: an RS256 public key (from `chatmesh keygen`) wins; else the HS256 secret, inline or in a
    file (created on first use). Mixed into a part's settings, whose `env_prefix` names the variables."""

    model_config = SettingsConfigDict(frozen=True)

    jwt_public_key_file: Path | None = Field(None, description="RS256: PEM public key (chatmesh keygen)")
    jwt_secret: str | None = Field(None, description="HS256: the shared secret (at least 32 characters)")
    jwt_secret_file: Path | None = Field(
        DEV_SECRET_FILE, description="HS256: the file holding the secret; created on first use if missing"
    )
    jwt_issuer: str | None = Field(None, description="the `iss` a token must carry; unset: not checked")
    jwt_audience: str | None = Field(None, description="the `aud` a token must carry; unset: not checked")
    jwt_clock_skew_s: int = Field(
        JWT_LEEWAY_S, ge=0, description="seconds a token's exp, nbf and iat may be off (clock drift)"
    )
    api_key_secret: str | None = Field(
        None, description="HS256 secret that signs and verifies API keys (at least 32 characters)"
    )
    api_key_secret_file: Path = Field(
        API_KEY_SECRET_FILE,
        description="the file holding the API-key secret when api_key_secret is unset; created on first use",
    )
    api_key_issuer: str = Field(
        API_KEY_ISSUER, min_length=1, description="the `iss` of API keys (tells them from sign-in tokens)"
    )

    def uses_dev_secret(self) -> bool:
        """Whether tokens are checked with the mesh's own dev secret (no key configured)."""
        return (
            self.jwt_public_key_file is None
            and not self.jwt_secret
            and self.jwt_secret_file == DEV_SECRET_FILE
        )

    def jwt_keys(self) -> JwtKeys:
        """The verification keys these settings describe: the RS256 public key first, else the HS256
        secret (inline wins over the file, which is created on first use)."""
        if self.jwt_public_key_file is not None:
            return JwtKeys.rs256(
                self.jwt_public_key_file.read_text(),
                None,
                self.jwt_issuer,
                self.jwt_audience,
                self.jwt_clock_skew_s,
            )
        if self.jwt_secret:
            secret = self.jwt_secret
        elif self.jwt_secret_file is not None:
            secret = load_or_create_secret(self.jwt_secret_file)
        else:
            prefix = self.model_config.get("env_prefix", "")
            raise ValueError(
                f"no JWT key configured: set {prefix}JWT_PUBLIC_KEY_FILE, _JWT_SECRET or _JWT_SECRET_FILE"
            )
        return JwtKeys.hs256(secret, self.jwt_issuer, self.jwt_audience, self.jwt_clock_skew_s)

    def api_key_keys(self) -> JwtKeys:
        """The HS256 key that signs and verifies API keys (the mesh's own: no identity provider issues
        them), with their issuer; the secret inline, else from its file (created on first use)."""
        secret = self.api_key_secret or load_or_create_secret(self.api_key_secret_file)
        return JwtKeys.hs256(secret, self.api_key_issuer, None, self.jwt_clock_skew_s)

    def jwt_settings(self) -> dict[str, Any]:
        """These settings' JWT fields by name, to give another part the same keys and rules."""
        return self.model_dump(include=set(JwtSettings.model_fields))
