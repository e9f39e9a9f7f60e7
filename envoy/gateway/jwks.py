"""The verification keys as the JSON Web Key Set `jwt_authn` reads (the same keys the chat service checks
tokens with, `chatmesh.common.auth.JwtKeys`)."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatmesh.common.auth import JwtKeys


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwks(keys: JwtKeys) -> dict[str, Any]:
    """The JSON Web Key Set that lets `jwt_authn` verify what `keys` verifies.

    HS256: the shared secret as an `oct` key. RS256: the public key's modulus and exponent (RFC 7518
    §6.3.1, base64url big-endian); `ValueError` if the PEM is not an RSA public key.
    """
    if keys.algorithm == "HS256":
        secret = base64.urlsafe_b64encode(keys.verify_key.encode()).rstrip(b"=").decode()
        return {"keys": [{"kty": "oct", "alg": "HS256", "k": secret}]}
    if keys.algorithm == "RS256":
        try:
            public_key = serialization.load_pem_public_key(keys.verify_key.encode())
        except ValueError as exc:
            raise ValueError(
                f"the JWT public key is not a PEM public key ({exc}); create a key pair with"
                " `chatmesh keygen`"
            ) from exc
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ValueError(
                "the JWT public key must be an RSA key for RS256; create one with `chatmesh keygen`"
            )
        numbers = public_key.public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                }
            ]
        }
    raise ValueError(f"the gateway cannot check {keys.algorithm} tokens; use HS256 or RS256")
