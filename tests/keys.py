"""The admin key every test's stack shares, and keys of other kinds made through a real registry.

Each pytest process makes one admin secret at import and exports it as ``TAKEOFF_API_KEY`` (what the
CLI, the SDK and the services started by tests present) and, through a file, as
``TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE`` (what every registry a test starts imports as its first admin key).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

ADMIN_KEY = f"tko_testadmin_{secrets.token_urlsafe(32)}"


def export_admin_key() -> Path:
    """Write the admin key's bootstrap file and set the variables; returns the file."""
    directory = Path(tempfile.mkdtemp(prefix="takeoff-test-keys-"))
    path = directory / "admin.key"
    path.write_text(ADMIN_KEY + "\n")
    path.chmod(0o600)
    os.environ["TAKEOFF_API_KEY"] = ADMIN_KEY
    os.environ["TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE"] = str(path)
    return path
