"""`chatmesh keygen`: key material for JWTs, written to files the services and the gateway read.

RS256 (the default) writes a key pair: the private key signs tokens (`chatmesh token USER
--private-key FILE`, or an identity provider), the public key is all the chat service
(`CHATMESH_CHAT_JWT_PUBLIC_KEY_FILE`) and the gateway (`CHATMESH_GATEWAY_JWT_PUBLIC_KEY_FILE`) need.
HS256 writes one shared secret that both sign and verify with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatmesh.common.auth import generate_secret

RSA_KEY_BITS = 2048
"""RS256 keys: 2048-bit RSA (RFC 7518 §3.3 minimum; what identity providers issue by default)."""


@dataclass(frozen=True, slots=True)
class KeyPairFiles:
    """Where `write_rs256_key_pair` put the keys."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes, force: bool) -> None:
    # Created with mode 600 in one step: the secret is never readable by others, not even briefly.
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists; pass --force to replace it (tokens it signed stop working)"
        ) from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file replaced with --force keeps no wider mode
        file.write(data)


def write_rs256_key_pair(
    private_path: Path, public_path: Path, force: bool = False, bits: int = RSA_KEY_BITS
) -> KeyPairFiles:
    """Generate an RSA key pair for RS256: the private key as PKCS#8 PEM (mode 600), the public key
    as SubjectPublicKeyInfo PEM. `FileExistsError` if a file exists and `force` is false."""
    if not force and public_path.exists():
        raise FileExistsError(f"{public_path} exists; pass --force to replace it")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (private_path, public_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(private_path, private_pem, force)
    public_path.write_bytes(public_pem)
    return KeyPairFiles(private_path, public_path)


def write_hs256_secret(path: Path, force: bool = False) -> Path:
    """Write a fresh random HS256 secret to `path` (mode 600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, generate_secret().encode(), force)
    return path


def rs256_instructions(files: KeyPairFiles) -> str:
    """What to do with a new key pair: the settings that point at it and how to sign a token."""
    public = files.public_key.resolve()
    private = files.private_key.resolve()
    return (
        f"wrote {private} (private key, mode 600) and {public} (public key)\n\n"
        "Verify tokens with the public key, in the chat service and in the gateway\n"
        "(`chatmesh run` hands the chat service's key to its gateway by itself):\n"
        f"  export CHATMESH_CHAT_JWT_PUBLIC_KEY_FILE={public}\n"
        f"  export CHATMESH_GATEWAY_JWT_PUBLIC_KEY_FILE={public}\n\n"
        "Sign tokens with the private key (keep it with whoever issues tokens):\n"
        f"  chatmesh token USER --private-key {private}\n"
    )


def hs256_instructions(path: Path) -> str:
    """What to do with a new HS256 secret."""
    secret = path.resolve()
    return (
        f"wrote {secret} (HS256 secret, mode 600)\n\n"
        "The chat service and the gateway both sign and verify with it:\n"
        f"  export CHATMESH_CHAT_JWT_SECRET_FILE={secret}\n"
        f"  export CHATMESH_GATEWAY_JWT_SECRET_FILE={secret}\n\n"
        "  chatmesh token USER   # signs with CHATMESH_CHAT_JWT_SECRET_FILE\n"
    )
