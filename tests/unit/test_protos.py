"""The API definition: generated stubs (ours and the vendored reflection v1) match the protos, and buf's
STANDARD lint and format pass."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

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
    return subprocess.run([binary, *args], cwd=ROOT, capture_output=True, check=False, text=True, timeout=120)


def test_buf_lint_is_clean() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = buf("format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr
