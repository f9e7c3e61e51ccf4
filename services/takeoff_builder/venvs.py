"""Virtualenvs for local-process runs: one per environment key, with the requirements installed.

The interpreter is the one the job asks for: ``python3.X`` found on the builder's PATH, or the
builder's own when the job names none (or names the builder's). A version the builder does not have
fails the build; nothing else is ever substituted.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from takeoff_builder.locks import KeyedLocks, Locks
from takeoff_builder.model import BuildFailed, BuildInfraError, Environment
from takeoff_builder.pip import PackageIndex, pip_failure
from takeoff_builder.shelf import Shelf

Log = Callable[[str], None]

_VERSION = re.compile(r"3\.[0-9]{1,2}(\.[0-9]{1,3})?")
_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
REQUIREMENTS_FILE = "takeoff-requirements.txt"


def version_matches(actual: str, requested: str) -> bool:
    """``3.12.4`` matches ``3.12`` and ``3.12.4``, not ``3.1`` or ``3.12.5``."""
    return actual == requested or actual.startswith(requested + ".")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


async def run_logged(
    argv: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run ``argv``, sending each output line to ``log`` as it comes; returns the status and the lines."""
    log("$ " + " ".join(argv))
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            log(line)
        return await process.wait(), lines
    finally:
        if process.returncode is None:  # cancelled: the build is abandoned, so is its process
            process.kill()
            await process.wait()


def check_python_version(requested: str) -> None:
    if not _VERSION.fullmatch(requested):
        raise BuildFailed(f"python_version {requested!r} is not a Python 3 version such as 3.12 or 3.12.4")


async def find_python(requested: str) -> Path:
    """The interpreter for ``requested`` (``3.12``, ``3.12.4``, or empty for the builder's own)."""
    own = ".".join(str(part) for part in sys.version_info[:3])
    if not requested or version_matches(own, requested):
        return Path(sys.executable)
    check_python_version(requested)
    minor = ".".join(requested.split(".")[:2])
    found = shutil.which(f"python{minor}")
    if found is not None:
        probe = await asyncio.create_subprocess_exec(
            found, "-c", _PROBE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        output, _ = await probe.communicate()
        actual = output.decode().strip()
        if probe.returncode == 0 and version_matches(actual, requested):
            return Path(found)
    raise BuildFailed(
        f"python {requested} is not available on this builder (it runs {own}; no working "
        f"python{minor} with that version is on its PATH)"
    )


class Venvs:
    def __init__(
        self, root: Path, index: PackageIndex, *, pip_cache: Path, locks: Locks | None = None
    ) -> None:
        self._shelf = Shelf(root)
        self._index = index
        self._pip_cache = pip_cache
        self._locks = locks or KeyedLocks()

    async def lookup(self, environment_key: str) -> Path | None:
        found = await asyncio.to_thread(self._shelf.lookup, environment_key)
        return found if found is not None and venv_python(found).exists() else None

    def hand_out(self, environment_key: str) -> Path | None:
        """The cached venv for ``environment_key``, its lease renewed (``Shelf.hand_out``); blocks."""
        found = self._shelf.hand_out(environment_key)
        return found if found is not None and venv_python(found).exists() else None

    async def ensure(
        self, environment_key: str, environment: Environment, log: Log, *, rebuild: bool = False
    ) -> Path:
        """The venv for ``environment_key``, made unless it is cached."""
        async with self._locks.hold(environment_key):
            if not rebuild and (cached := await self.lookup(environment_key)):
                log(f"venv {environment_key[:16]} is cached")
                return cached
            python = await find_python(environment.python_version)
            entry = await asyncio.to_thread(self._shelf.new_entry, environment_key)
            try:
                await self._make(entry, python, environment.requirements, log)
                return await asyncio.to_thread(self._shelf.publish, environment_key, entry)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(Shelf.discard, entry))
                raise

    async def _make(self, venv: Path, python: Path, requirements: str, log: Log) -> None:
        status, _ = await run_logged([str(python), "-m", "venv", str(venv)], log)
        if status != 0:
            raise BuildInfraError(f"{python} could not create a virtualenv (exit status {status})")
        if not requirements.strip():
            log("no requirements to install")
            return
        requirements_file = venv / REQUIREMENTS_FILE
        await asyncio.to_thread(requirements_file.write_text, requirements)
        environment = {
            **os.environ,
            **self._index.environment(),
            "PIP_CACHE_DIR": str(self._pip_cache),
            "VIRTUAL_ENV": str(venv),
        }
        status, output = await run_logged(
            [str(venv_python(venv)), "-m", "pip", "install", "-r", str(requirements_file)],
            log,
            env=environment,
        )
        if status != 0:
            raise pip_failure(output, what="pip could not install the requirements")
