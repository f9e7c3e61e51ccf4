"""The API definition: generated stubs (ours and the vendored reflection v1) match the protos, buf's
STANDARD lint and format pass, and the vendored protos describe the messages the servers really send."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("genprotos", ROOT / "tools" / "genprotos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = generator.generate(tmp_path)  # type: ignore[attr-defined]
    committed = sorted(
        p.relative_to(ROOT / "libs")
        for package in generator.PACKAGES  # type: ignore[attr-defined]
        for p in (ROOT / "libs" / package.python_dir).glob("*_pb2*")
    )

    assert fresh == committed, "run `make protos` and commit the result"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / "libs" / p).read_bytes()]
    assert not stale, f"stale generated stubs (run `make protos`): {stale}"


def buf(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("buf") or str(ROOT / ".tools/node_modules/.bin/buf")
    require("buf", Path(binary).exists(), "npm install @bufbuild/buf (make tools does)")
    return subprocess.run([binary, *args], cwd=ROOT, capture_output=True, check=False, text=True, timeout=90)


def test_buf_lint_is_clean() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = buf("format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


Fields = set[tuple[str, int, int]]
"""A message's fields as (name, number, type): what decides how its bytes decode."""


@pytest.fixture(scope="module")
def vendored_messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fields]:
    """Every message of the vendored protos by full name, compiled by protoc as a client would."""
    protos = ROOT / "protos"
    vendored = sorted(
        str(p.relative_to(protos)) for tree in ("google", "grpc") for p in (protos / tree).rglob("*.proto")
    )
    out = tmp_path_factory.mktemp("vendored") / "vendored.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={protos}",
            f"--descriptor_set_out={out}",
            *vendored,
        ],
        check=True,
    )
    messages: dict[str, Fields] = {}

    def collect(prefix: str, types: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in types:
            name = f"{prefix}.{message.name}"
            messages[name] = {(f.name, f.number, f.type) for f in message.field}
            collect(name, message.nested_type)

    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        collect(file.package, file.message_type)
    return messages


def _fields(message: Descriptor) -> Fields:
    return {(f.name, f.number, f.type) for f in message.fields}


@pytest.mark.parametrize(
    "sent",
    [
        status_pb2.Status.DESCRIPTOR,
        error_details_pb2.ErrorInfo.DESCRIPTOR,
        error_details_pb2.BadRequest.DESCRIPTOR,
        error_details_pb2.BadRequest.FieldViolation.DESCRIPTOR,
        health_pb2.HealthCheckRequest.DESCRIPTOR,
        health_pb2.HealthCheckResponse.DESCRIPTOR,
    ],
    ids=lambda message: message.full_name,
)
def test_vendored_protos_decode_every_field_the_servers_send(
    vendored_messages: dict[str, Fields], sent: Descriptor
) -> None:
    assert _fields(sent) <= vendored_messages[sent.full_name]


def test_reflection_v1_messages_are_wire_identical_to_v1alpha(vendored_messages: dict[str, Fields]) -> None:
    # takeoff_server.reflection answers v1 with the v1alpha servicer, re-reading each message's bytes.
    v1 = {
        name: fields for name, fields in vendored_messages.items() if name.startswith("grpc.reflection.v1.")
    }
    pool = descriptor_pool.Default()

    assert len(v1) == len(v1alpha_pb2.DESCRIPTOR.message_types_by_name) > 0
    for name, fields in v1.items():
        assert fields == _fields(pool.FindMessageTypeByName(name.replace(".v1.", ".v1alpha."))), name
