"""Lets a job's venv import the ``takeoff`` SDK without installing it there.

The agent puts a directory holding only a ``sitecustomize.py`` on the job's ``PYTHONPATH``; at start-up
it appends the agent's own site-packages to ``sys.path``. Appended, not prepended: whatever the job's
requirements installed in its venv still wins. It needs the same Python minor version as the agent
(compiled packages such as grpcio are per version); for another version, the job must bring the SDK.
"""

from __future__ import annotations

import site
import sys
from pathlib import Path

_SITECUSTOMIZE = """\
# Written by the Takeoff agent: the SDK and its dependencies, after the job's own packages.
import site

for directory in {directories!r}:
    site.addsitedir(directory)
"""


def write_sdk_site(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "sitecustomize.py.partial"
    partial.write_text(_SITECUSTOMIZE.format(directories=site.getsitepackages()))
    partial.replace(directory / "sitecustomize.py")
    return directory


def venv_python_version(venv: Path) -> str | None:
    """``3.11`` from the venv's ``pyvenv.cfg``, or None if it says nothing."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            return ".".join(value.strip().split(".")[:2])
    return None


def matches_agent_python(venv: Path) -> bool:
    return venv_python_version(venv) == f"{sys.version_info.major}.{sys.version_info.minor}"
