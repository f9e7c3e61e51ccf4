"""The SDK wheel every built image installs and ``takeoff sdk wheel`` writes: what it holds, that its
bytes never vary, and that it installs and works without any package index."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import typer
from typer.testing import CliRunner

from takeoff._sdk_wheel import sdk_wheel
from takeoff.cli import sdk_commands
from takeoff_builder.images import SDK_CHECK

DIST_INFO = "takeoff_sdk-0.1.0.dist-info"
PIP_SECONDS = 60


def read_wheel(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_wheel_holds_the_sdk_only_with_its_runtime_dependencies_and_a_valid_record() -> None:
    wheel = sdk_wheel()
    entries = read_wheel(wheel.content)

    assert wheel.filename == "takeoff_sdk-0.1.0-py3-none-any.whl"
    assert {"takeoff/__init__.py", "takeoff/_run.py", "takeoff/client.py", "takeoff/v1/runs_pb2.py"} <= set(
        entries
    )
    assert "takeoff_rpc/retries.py" in entries
    assert {"takeoff/py.typed", "takeoff_rpc/py.typed", "takeoff/v1/runs_pb2.pyi"} <= set(entries)
    tops = {name.split("/")[0] for name in entries}
    assert tops == {"takeoff", "takeoff_rpc", DIST_INFO}
    assert not [name for name in entries if name.startswith(("takeoff/cli/", "takeoff/stack.py"))]
    metadata = entries[f"{DIST_INFO}/METADATA"].decode().splitlines()
    assert "Name: takeoff-sdk" in metadata
    requirements = [
        line.removeprefix("Requires-Dist: ") for line in metadata if line.startswith("Requires-Dist")
    ]
    assert [requirement.split("<")[0].split(">")[0] for requirement in requirements] == [
        "grpcio",
        "protobuf",
        "googleapis-common-protos",
        "pathspec",
        "opentelemetry-proto",
    ]
    assert "protobuf<8,>=6.31" in requirements  # the range of pyproject.toml
    record_name = f"{DIST_INFO}/RECORD"
    assert list(entries)[-1] == record_name
    rows = list(csv.reader(io.StringIO(entries[record_name].decode())))
    assert {row[0] for row in rows} == set(entries)
    for path, digest, size in rows:
        if path != record_name:
            expected = base64.urlsafe_b64encode(hashlib.sha256(entries[path]).digest()).rstrip(b"=")
            assert (digest, int(size)) == (f"sha256={expected.decode()}", len(entries[path]))


def test_the_wheel_is_the_same_bytes_every_time() -> None:
    first, second = sdk_wheel(), sdk_wheel()

    assert first.content == second.content
    assert first.sha256 == second.sha256 == hashlib.sha256(first.content).hexdigest()
    with zipfile.ZipFile(io.BytesIO(first.content)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_the_wheel_installs_offline_and_runs_without_server_code(tmp_path: Path) -> None:
    wheel = sdk_wheel().write(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=PIP_SECONDS)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps", "-q", wheel],
        check=True,
        timeout=PIP_SECONDS,
    )
    # Third-party packages from this environment, on PYTHONPATH: its .pth files (the editable Takeoff,
    # and with it the server packages) are not read from there, so only the installed SDK can be imported.
    packages = sysconfig.get_paths()["purelib"]
    code = (
        "import importlib.util, takeoff, takeoff._run, takeoff.client; "
        "print(takeoff.__version__, takeoff.__file__); "
        "print([name for name in ('takeoff_server', 'takeoff_builder', 'takeoff.cli')"
        " if importlib.util.find_spec(name)])"
    )
    imported = subprocess.run(
        [python, "-c", code],
        env={**os.environ, "PYTHONPATH": packages},
        capture_output=True,
        text=True,
        check=True,
        timeout=PIP_SECONDS,
    )

    version, location = imported.stdout.splitlines()[0].split()
    assert version == "0.1.0"
    assert Path(location).is_relative_to(venv)
    assert imported.stdout.splitlines()[1] == "[]"

    checked = subprocess.run(
        [python, "-c", SDK_CHECK], check=False, capture_output=True, text=True, timeout=PIP_SECONDS
    )
    assert (checked.returncode, checked.stderr) == (0, "")


def test_the_image_check_refuses_an_environment_where_a_package_named_takeoff_is_installed() -> None:
    # This environment has Takeoff itself installed as the distribution `takeoff`, as a job's requirements
    # would get the unrelated package of that name from the public index.
    checked = subprocess.run(
        [sys.executable, "-c", SDK_CHECK], check=False, capture_output=True, text=True, timeout=30
    )

    assert checked.returncode == 1
    assert checked.stderr.strip() == (
        "the requirements replaced the Takeoff SDK with the unrelated package named takeoff: remove it"
    )


def test_takeoff_sdk_wheel_writes_the_wheel_and_prints_its_path(tmp_path: Path) -> None:
    app = typer.Typer()
    sdk_commands.register(app)
    app.command()(lambda: None)  # a second command, so `sdk` stays a group as in the full CLI

    written = CliRunner().invoke(app, ["sdk", "wheel", str(tmp_path / "out")])
    refused = CliRunner().invoke(app, ["sdk", "wheel", "/proc/takeoff-no-such-directory"])

    assert written.exit_code == 0, written.output
    path = Path(written.stdout.strip())
    assert path == tmp_path / "out" / "takeoff_sdk-0.1.0-py3-none-any.whl"
    assert path.read_bytes() == sdk_wheel().content
    assert refused.exit_code == 1
    assert "could not write the wheel into /proc/takeoff-no-such-directory" in refused.output
