"""Run tokens a queue signs itself (docs/design.md §13, "Signed run tokens").

Minting a token in the registry is a durable write on the way from Enqueue to Assignment. Instead the
queue signs each attempt's scope (``RunTokenClaims``) with an Ed25519 key pair it made at start and whose
public half it registered (``KeyService.CreateRunTokenSigner``); the registry checks the signature and
stores nothing per token. A token is ``tko_{signer}_{claims}.{signature}``, each part in unpadded
base64url, so it reads as a key everywhere one is looked for (the ``tko_{id}_`` prefix).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets as random_secrets
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import DecodeError

from takeoff.v1 import keys_pb2

MAX_SIGNED_TOKEN_CHARS = 4096
"""A longer scope (dozens of secrets with long names) is minted by the registry instead: a token travels in
every call's metadata, whose size gRPC bounds (8 KiB by default)."""
PUBLIC_KEY_BYTES = 32
_SIGNED = re.compile(r"tko_([a-z][a-z0-9-]{0,62})_([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{86})")
"""86 characters: a 64-byte signature."""


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Claims(NamedTuple):
    """A signed token's scope, as the registry reads it once the signature is checked."""

    key_id: str
    run: str
    item: str
    job_version: str
    secrets: tuple[str, ...]
    issue_time: datetime


class SignedToken(NamedTuple):
    """A presented token split into its parts, its signature not yet checked."""

    signer_id: str
    claims: bytes
    signature: bytes

    def verified_claims(self, public_key: bytes) -> Claims | None:
        """The claims, when ``public_key`` signed them; None for a forged or damaged token."""
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.claims)
            claims = keys_pb2.RunTokenClaims.FromString(self.claims)
        except (InvalidSignature, ValueError, DecodeError):
            return None
        return Claims(
            claims.key_id,
            claims.run,
            claims.item,
            claims.job_version,
            tuple(claims.secrets),
            claims.issue_time.ToDatetime(tzinfo=UTC),
        )


def read_signed(secret: str) -> SignedToken | None:
    """The parts of a signed run token; None when ``secret`` is not one (a stored key's, or garbage)."""
    if len(secret) > MAX_SIGNED_TOKEN_CHARS or (matched := _SIGNED.fullmatch(secret)) is None:
        return None
    try:
        return SignedToken(matched[1], _decode(matched[2]), _decode(matched[3]))
    except (binascii.Error, ValueError):
        return None


def valid_public_key(public_key: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        return False
    return True


class RunTokenSigner:
    """A queue's signing key: made in memory at start, never written anywhere; only its public half
    leaves the process (registered with the registry, which then knows it as ``signer_id``)."""

    def __init__(self) -> None:
        self._private_key = Ed25519PrivateKey.generate()
        self.public_key = self._private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(
        self,
        signer_id: str,
        *,
        run: str,
        item: str,
        job_version: str,
        secrets: list[str],
        issue_time: datetime,
    ) -> str | None:
        """The token of one attempt, or None when its scope is too long for a signed one."""
        claims = keys_pb2.RunTokenClaims(
            key_id=f"run-{random_secrets.token_hex(8)}",
            run=run,
            item=item,
            job_version=job_version,
            secrets=secrets,
        )
        claims.issue_time.FromDatetime(issue_time)
        payload = claims.SerializeToString()
        token = f"tko_{signer_id}_{_encode(payload)}.{_encode(self._private_key.sign(payload))}"
        return token if len(token) <= MAX_SIGNED_TOKEN_CHARS else None
