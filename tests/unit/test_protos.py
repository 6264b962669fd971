"""The committed generated code and the SDK's copy of the .proto files are what protos/ holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_the_protos_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *map(str, sorted((ROOT / "protos/vitlens/v1").glob("*.proto")))],
        check=True,
    )  # fmt: skip
    generated = sorted((tmp_path / "vitlens/v1").iterdir())
    assert generated, "protoc generated nothing"
    committed = ROOT / "client/vitlens/v1"
    for path in generated:
        assert (committed / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `make protos` and commit the result"
        )


def test_the_sdk_ships_an_identical_copy_of_the_protos() -> None:
    """client/vitlens/protos/ (the import root of the .proto files in the SDK wheel) holds
    exactly protos/vitlens/v1/, byte for byte."""
    source = ROOT / "protos/vitlens/v1"
    copy = ROOT / "client/vitlens/protos/vitlens/v1"
    names = sorted(p.name for p in source.glob("*.proto"))
    assert names == ["tensor.proto", "vitlens.proto"]
    assert sorted(p.name for p in copy.iterdir()) == names, "run `make protos` and commit"
    for name in names:
        assert (copy / name).read_bytes() == (source / name).read_bytes(), (
            f"client/vitlens/protos/vitlens/v1/{name} differs from protos/: run `make protos`"
        )
