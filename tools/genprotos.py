"""Generate the Python, gRPC and typing stubs for protos/takeoff/v1 into OUT_DIR (default: libs).

`make protos` writes them into the source tree; the stale-stub test writes them into a temporary
directory and compares bytes. grpcio-tools and mypy-protobuf are pinned exactly in pyproject.toml, so
the output is the same on every machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("takeoff", "v1")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto file; returns the generated files, relative to ``out_dir``."""
    out_dir = out_dir.resolve()
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    (out_dir / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / PACKAGE_DIR).glob("*_pb2*"):
        stale.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(plugin_dir))}",
            f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(plugin_dir))}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ],
        check=True,
        cwd=PROTO_ROOT,
    )
    return sorted(p.relative_to(out_dir) for p in (out_dir / PACKAGE_DIR).glob("*_pb2*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "libs"
    for path in generate(target):
        print(path)
