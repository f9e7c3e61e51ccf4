"""Which key and which transport a client uses: one lookup for ``takeoff.Client``, ``takeoff.init`` and
every CLI command.

The key, first found wins:

1. the key given in code or on the command line (``Client(api_key=...)``, ``takeoff --key``);
2. ``TAKEOFF_API_KEY``;
3. ``TAKEOFF_TOKEN``, the run token an agent gives each job it launches;
4. the admin key file ``takeoff up`` writes, ``$TAKEOFF_HOME/keys/admin.key``.

TLS: a ``host:port`` target is dialled with TLS when ``TAKEOFF_TLS_CA_FILE`` (the CA that signed the
servers' certificates) or ``TAKEOFF_TLS_CERT_FILE`` with ``TAKEOFF_TLS_KEY_FILE`` (this client's own
certificate, for mutual TLS) are set; a ``unix:`` target stays plaintext (only processes on the host reach
it). No function here prints or logs a key.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from takeoff._home import takeoff_home

if TYPE_CHECKING:
    from pathlib import Path

    import grpc

API_KEY_ENV = "TAKEOFF_API_KEY"
RUN_TOKEN_ENV = "TAKEOFF_TOKEN"
TLS_CA_ENV = "TAKEOFF_TLS_CA_FILE"
TLS_CERT_ENV = "TAKEOFF_TLS_CERT_FILE"
TLS_KEY_ENV = "TAKEOFF_TLS_KEY_FILE"
KEYS_DIR = "keys"
ADMIN_KEY_FILE = "admin.key"


def keys_dir(home: Path | None = None) -> Path:
    """``$TAKEOFF_HOME/keys``: the admin key and the stack's service keys (mode 0700)."""
    return (home or takeoff_home()) / KEYS_DIR


def admin_key_path(home: Path | None = None) -> Path:
    """``$TAKEOFF_HOME/keys/admin.key``, the admin key ``takeoff up`` makes on its first start."""
    return keys_dir(home) / ADMIN_KEY_FILE


class FoundKey:
    """A key and where it came from (``source`` is safe to show; the secret is not in ``repr``). A plain
    class: a launched job finds its run token here, and a dataclass would cost it the import of
    dataclasses (see ``takeoff_rpc.backoff.RetryPolicy``); a named tuple would show the secret to
    whatever iterates or serializes it."""

    __slots__ = ("secret", "source")

    def __init__(self, secret: str, source: str) -> None:
        self.secret = secret
        self.source = source

    def __repr__(self) -> str:
        return f"FoundKey(source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FoundKey) and (self.secret, self.source) == (other.secret, other.source)

    def __hash__(self) -> int:
        return hash((self.secret, self.source))


def find_key(explicit: str | None = None, *, home: Path | None = None) -> FoundKey | None:
    """The key a client presents, by the order above; None when there is none anywhere."""
    if explicit:
        return FoundKey(explicit.strip(), "the key given")
    for variable in (API_KEY_ENV, RUN_TOKEN_ENV):
        if value := os.environ.get(variable, "").strip():
            return FoundKey(value, variable)
    path = admin_key_path(home)
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return FoundKey(value, str(path)) if value else None


def find_api_key(explicit: str | None = None, *, home: Path | None = None) -> str | None:
    """The secret of :func:`find_key`, or None."""
    found = find_key(explicit, home=home)
    return found.secret if found else None


def missing_key_hint(home: Path | None = None) -> str:
    """What to do when no key was presented, for error messages."""
    return (
        f"`takeoff up` makes an admin key in {admin_key_path(home)}; or pass --key KEY or set"
        f" {API_KEY_ENV} (in code: Client(api_key=...))"
    )


def tls_from_environment() -> grpc.ChannelCredentials | None:
    """Channel credentials from ``TAKEOFF_TLS_*_FILE``; None when none of them is set."""
    ca, cert, key = (os.environ.get(name) or None for name in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV))
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError(f"mutual TLS needs both {TLS_CERT_ENV} and {TLS_KEY_ENV}")
    from pathlib import Path

    from takeoff_rpc.channels import tls_credentials  # here: finding a key must not load gRPC

    return tls_credentials(
        Path(ca).expanduser() if ca else None,
        Path(cert).expanduser() if cert else None,
        Path(key).expanduser() if key else None,
    )


def channel_credentials(
    target: str, tls: bool | grpc.ChannelCredentials | None = None
) -> grpc.ChannelCredentials | None:
    """The credentials to dial ``target`` with: None (plaintext) for ``unix:`` targets and for
    ``tls=False``; ``tls`` itself when it is credentials; else from the environment, and with ``tls=True``
    and nothing in the environment, TLS checked against the system's roots."""
    if target.startswith("unix:") or tls is False:
        return None
    import grpc  # here: finding a key must not load gRPC (a run through the relay never dials)

    from takeoff_rpc.channels import tls_credentials

    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    credentials = tls_from_environment()
    if credentials is None and tls is True:
        return tls_credentials()
    return credentials
