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
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import DecodeError

from takeoff.v1 import keys_pb2
from takeoff_server.protovalues import timestamp
from takeoff_server.random_ids import random_hex

MAX_SIGNED_TOKEN_CHARS = 4096
"""A longer scope (dozens of secrets with long names) is minted by the registry instead: a token travels in
every call's metadata, whose size gRPC bounds (8 KiB by default)."""
PUBLIC_KEY_BYTES = 32
_SIGNED = re.compile(r"tko_([a-z][a-z0-9-]{0,62})_([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{86})")
"""86 characters: a 64-byte signature."""
TOKEN_KEY_ID = re.compile(r"run-[0-9a-f]{16}")
"""The ``key_id`` of a signed token's claims: the name callers see it by, never a stored key's."""

# Ed25519's curve (RFC 8032), for telling a small-order public key, which would verify forged signatures.
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_MINUS_ONE = pow(2, (_P - 1) // 4, _P)


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    """The bytes of canonical unpadded base64url only: unused low bits set would let one token be written
    in several ways, each passing the signature check (and a mask or scan for the token's exact text)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


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
        """The claims, when ``public_key`` signed them and they name the token as a signed one; None for a
        forged or damaged token."""
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.claims)
            claims = keys_pb2.RunTokenClaims.FromString(self.claims)
        except (InvalidSignature, ValueError, DecodeError):
            return None
        if not TOKEN_KEY_ID.fullmatch(claims.key_id):
            return None  # a signer names its tokens as RunTokenSigner.sign does, never as another key
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
    """Whether ``public_key`` is an Ed25519 public key a signature can be checked against: 32 bytes that
    decode to a point of the curve outside its small subgroup (a small-order key verifies signatures that
    nobody made, such as R = identity, S = 0, for every message)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    point = _decoded_point(public_key)
    if point is None:
        return False
    for _ in range(3):  # times the cofactor, 8
        point = _added(point, point)
    return point != (0, 1)


def _decoded_point(encoded: bytes) -> tuple[int, int] | None:
    """RFC 8032 §5.1.3; None when the bytes are no point of the curve."""
    number = int.from_bytes(encoded, "little")
    y, x_is_odd = number & ((1 << 255) - 1), number >> 255
    if y >= _P:
        return None
    x_squared = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x_squared, (_P + 3) // 8, _P)
    if (x * x - x_squared) % _P:
        x = x * _SQRT_MINUS_ONE % _P
    if (x * x - x_squared) % _P or (x == 0 and x_is_odd):
        return None
    return (_P - x if x & 1 != x_is_odd else x), y


def _added(first: tuple[int, int], second: tuple[int, int]) -> tuple[int, int]:
    """The sum of two points: the twisted Edwards addition law (a = -1), complete on this curve."""
    (x1, y1), (x2, y2) = first, second
    product = _D * x1 * x2 * y1 * y2 % _P
    x = (x1 * y2 + y1 * x2) * pow(1 + product, -1, _P) % _P
    y = (y1 * y2 + x1 * x2) * pow(1 - product, -1, _P) % _P
    return x, y


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
            key_id=f"run-{random_hex(16)}",
            run=run,
            item=item,
            job_version=job_version,
            secrets=secrets,
            issue_time=timestamp(issue_time),
        )
        payload = claims.SerializeToString()
        token = f"tko_{signer_id}_{_encode(payload)}.{_encode(self._private_key.sign(payload))}"
        return token if len(token) <= MAX_SIGNED_TOKEN_CHARS else None
