"""The committed generated code is what the protos generate."""

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
