"""A wheel of the running SDK, for job images (docs/design.md §6, §16 "The SDK inside images").

The wheel is written here, from the files of the ``takeoff`` and ``takeoff_rpc`` packages this process
imports, rather than by a build backend: it needs no network and no build tools, and what a job gets is
exactly the SDK that launched it. Its bytes depend only on those files, the version and the dependency
ranges (entries sorted, fixed timestamps and modes), so its sha256 identifies the SDK and can be part of
the builder's environment key.

It holds the SDK only: the CLI (``takeoff.cli``) and the local stack (``takeoff.stack``) start and manage
Takeoff's services, which an image does not have, and need packages a job does not. The distribution is
named ``takeoff-sdk``, never ``takeoff``, a name that is not ours on the public index; it is installed from
its file (``pip install PATH``), only its dependencies come from the package index.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import takeoff
import takeoff_rpc

DISTRIBUTION = "takeoff-sdk"
PACKAGES = (takeoff, takeoff_rpc)
LEFT_OUT = ("takeoff/cli/", "takeoff/stack.py")
"""Paths of the packages that are not the SDK (see above)."""
SHIPPED = ("*.py", "*.pyi", "py.typed")
"""The packages' files the wheel holds: the modules, the type stubs of the generated ones, and the marker
telling type checkers that the SDK is typed (PEP 561)."""
RUNTIME_DEPENDENCIES = ("grpcio", "protobuf", "googleapis-common-protos", "pathspec", "opentelemetry-proto")
"""What the SDK's modules import beyond the standard library: gRPC, the message classes, the ``google.rpc``
error details, ``pathspec`` for ``Client`` uploading a directory, and the OTLP messages a traced job sends
its spans in (``takeoff._trace``; they need only protobuf, not the OpenTelemetry SDK). Their version ranges
are those of the installed Takeoff distribution (pyproject.toml)."""

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
_COMPRESS_LEVEL = 9
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WHEEL = f"""\
Wheel-Version: 1.0
Generator: takeoff {takeoff.__version__}
Root-Is-Purelib: true
Tag: py3-none-any
"""


@dataclass(frozen=True, slots=True)
class SdkWheel:
    filename: str
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def write(self, directory: Path) -> Path:
        """Write the wheel into ``directory`` (made if missing), replacing a file of that name atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename
        descriptor, partial = tempfile.mkstemp(dir=directory, prefix=f".{self.filename}.")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(self.content)
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return path


def sdk_wheel() -> SdkWheel:
    """The wheel of the SDK this process runs."""
    version = takeoff.__version__
    stem = f"{DISTRIBUTION.replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    entries = {path: file.read_bytes() for path, file in _sdk_files()}
    entries[f"{dist_info}/METADATA"] = _metadata(version).encode()
    entries[f"{dist_info}/WHEEL"] = _WHEEL.encode()
    entries[f"{dist_info}/top_level.txt"] = "".join(f"{p.__name__}\n" for p in PACKAGES).encode()
    record = f"{dist_info}/RECORD"
    entries[record] = _record(entries, record)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # RECORD last, as installers expect; the rest in sorted order so the bytes never vary.
        for path in [*sorted(set(entries) - {record}), record]:
            info = zipfile.ZipInfo(path, date_time=_ZIP_EPOCH)
            info.external_attr = _FILE_MODE
            info.create_system = 3  # Unix, whatever the platform, so the mode above is read as such
            archive.writestr(info, entries[path], zipfile.ZIP_DEFLATED, _COMPRESS_LEVEL)
    return SdkWheel(f"{stem}-py3-none-any.whl", buffer.getvalue())


def _sdk_files() -> Iterator[tuple[str, Path]]:
    """(path in the wheel, file) of every file of the SDK the wheel holds."""
    for package in PACKAGES:
        assert package.__file__ is not None
        root = Path(package.__file__).parent
        for pattern in SHIPPED:
            for file in root.rglob(pattern):
                path = f"{package.__name__}/{file.relative_to(root).as_posix()}"
                if "__pycache__" not in file.parts and not path.startswith(LEFT_OUT):
                    yield path, file


SDK_REQUIRES_PYTHON = ">=3.11"
"""What the SDK needs, which is less than the services do (they need 3.11.4's tarfile filters): a job's image
may bring any Python 3.11, such as Debian bookworm's 3.11.2."""


def _metadata(version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {DISTRIBUTION}",
        f"Version: {version}",
        "Summary: The Takeoff SDK (takeoff.init, takeoff.Client), from the Takeoff that wrote this wheel",
        f"Requires-Python: {SDK_REQUIRES_PYTHON}",
        *(f"Requires-Dist: {requirement}" for requirement in _runtime_requirements()),
    ]
    return "\n".join(lines) + "\n"


def _installed_metadata() -> importlib.metadata.PackageMetadata:
    """The metadata of the distribution this SDK came from: Takeoff itself, or an installed SDK wheel."""
    for name in ("takeoff", DISTRIBUTION):
        try:
            return importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise RuntimeError("the running takeoff package is not installed as a distribution (pip install it)")


def _runtime_requirements() -> list[str]:
    """The installed distribution's requirements on ``RUNTIME_DEPENDENCIES``, in that order."""
    ranges: dict[str, str] = {}
    for requirement in _installed_metadata().get_all("Requires-Dist") or []:
        match = _NAME.match(requirement)
        if match is not None and "extra ==" not in requirement:
            ranges.setdefault(_normalized(match.group()), requirement)
    missing = [name for name in RUNTIME_DEPENDENCIES if name not in ranges]
    if missing:
        raise RuntimeError(f"the installed takeoff distribution does not require {', '.join(missing)}")
    return [ranges[name] for name in RUNTIME_DEPENDENCIES]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record(entries: dict[str, bytes], record: str) -> bytes:
    """RECORD (PEP 376, PEP 427): each file's urlsafe-base64 sha256 without padding, and its size."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for path in sorted(entries):
        digest = base64.urlsafe_b64encode(hashlib.sha256(entries[path]).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(entries[path])])
    writer.writerow([record, "", ""])
    return text.getvalue().encode()
