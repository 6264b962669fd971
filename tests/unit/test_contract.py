"""The contract checks `make test` runs can fail: buf lint refuses an enum without an
``_UNSPECIFIED`` zero value, and buf breaking refuses a removed field against the released image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools/node_modules/.bin/buf"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make proto-check`")


def _released() -> Path:
    images = sorted(
        (ROOT / "protos/releases").glob("*.binpb"),
        key=lambda p: tuple(int(part) for part in p.stem.lstrip("v").split(".")),
    )
    assert images, "no released contract in protos/releases"
    return images[-1]


def _workspace(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def _buf(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_contract_is_lint_clean_formatted_and_compatible() -> None:
    for args in (
        ["lint"],
        ["format", "-d", "--exit-code"],
        ["breaking", "--against", str(_released())],
    ):
        done = _buf(ROOT, *args)
        assert done.returncode == 0, f"buf {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_lint_refuses_a_zero_value_that_is_not_unspecified(tmp_path: Path) -> None:
    work = _workspace(tmp_path)
    proto = work / "protos/vitlens/v1/vitlens.proto"
    text = proto.read_text()
    proto.write_text(text.replace("OUTPUT_GRID_UNSPECIFIED = 0;", "OUTPUT_GRID_DEFAULT = 0;"))
    done = _buf(work, "lint")
    assert done.returncode != 0 and "OUTPUT_GRID_DEFAULT" in done.stdout


def test_breaking_refuses_a_removed_field(tmp_path: Path) -> None:
    work = _workspace(tmp_path)
    proto = work / "protos/vitlens/v1/vitlens.proto"
    text = proto.read_text()
    assert "  bool explain_label = 7;\n" in text
    proto.write_text(text.replace("  bool explain_label = 7;\n", ""))
    done = _buf(work, "breaking", "--against", str(_released()))
    assert done.returncode != 0 and "explain_label" in done.stdout
