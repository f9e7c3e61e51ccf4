"""Generate the Python, gRPC and typing stubs into OUT_DIR (default: libs).

Two packages: our API, protos/takeoff/v1 -> takeoff/v1; and the vendored gRPC reflection v1 proto, which
no installed package provides (grpcio-reflection ships only v1alpha), -> takeoff_server/_vendor/grpc/
reflection/v1. The vendored proto is compiled under that package's path, as grpcio's own packages do with
theirs, so that its stubs import each other from where they live and never shadow the `grpc` package.

`make protos` writes them into the source tree; the stale-stub test writes them into a temporary
directory and compares bytes. grpcio-tools and mypy-protobuf are pinned exactly in pyproject.toml, so
the output is the same on every machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


class StubPackage(NamedTuple):
    """The protos of one directory under protos/, compiled as if protos/ were mounted at ``mount``."""

    proto_dir: str
    mount: str = ""

    @property
    def python_dir(self) -> Path:
        """Where the stubs go, relative to the output directory."""
        return Path(self.mount, self.proto_dir)

    @property
    def proto_path(self) -> str:
        return f"{self.mount}={PROTO_ROOT}" if self.mount else str(PROTO_ROOT)


PACKAGES = (
    StubPackage("takeoff/v1"),
    StubPackage("grpc/reflection/v1", mount="takeoff_server/_vendor"),
)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every package's .proto files; returns the generated files, relative to ``out_dir``."""
    out_dir = out_dir.resolve()
    generated: list[Path] = []
    for package in PACKAGES:
        _generate_package(package, out_dir)
        generated += (p.relative_to(out_dir) for p in (out_dir / package.python_dir).glob("*_pb2*"))
    return sorted(generated)


def _generate_package(package: StubPackage, out_dir: Path) -> None:
    protos = sorted((PROTO_ROOT / package.proto_dir).glob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    (out_dir / package.python_dir).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / package.python_dir).glob("*_pb2*"):
        stale.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={package.proto_path}",
            f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(plugin_dir))}",
            f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(plugin_dir))}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *(str(PurePosixPath(package.mount, p.relative_to(PROTO_ROOT))) for p in protos),
        ],
        check=True,
        cwd=PROTO_ROOT,
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "libs"
    for path in generate(target):
        print(path)
