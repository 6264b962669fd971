"""keep_freed_memory: the pages of freed tensors-sized blocks stay with the process."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"

# Allocate and free 2-8 MiB blocks, as a model pass does with its activations, and print the
# minor page faults a repetition takes once warm.
PROGRAM = f"""
import sys
import numpy as np
sys.path.insert(0, {str(SERVER)!r})
from vitlens_server.host_memory import keep_freed_memory, minor_page_faults
if sys.argv[1] == "kept" and not keep_freed_memory():
    raise SystemExit("mallopt refused")
def step():
    live = [np.ones(n) for n in (2**18, 2**19, 2**20, 2**18, 2**20)]
    del live
for _ in range(3):
    step()
before = minor_page_faults()
for _ in range(20):
    step()
print((minor_page_faults() - before) / 20)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt and /proc/self/stat are glibc and Linux",
)


def faults_a_step(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


@glibc_only
def test_kept_blocks_are_reused_without_faulting_their_pages_in_again() -> None:
    default, kept = faults_a_step("glibc"), faults_a_step("kept")
    assert kept < 10  # 5 blocks, 20 MiB a step: 5,000 pages if they were faulted again
    assert default > 10 * (kept + 1)  # glibc's defaults hand them back and fault them again


@glibc_only
def test_keep_freed_memory_reports_success_on_glibc() -> None:
    from vitlens_server.host_memory import keep_freed_memory

    assert keep_freed_memory() is True


def test_keep_freed_memory_does_nothing_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlens_server import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize(
    ("argv", "environ", "kept"),
    [
        ([], {}, True),
        (["--return-freed-memory"], {}, False),
        ([], {"VITLENS_RETURN_FREED_MEMORY": "1"}, False),
    ],
)
def test_vitlens_serve_keeps_freed_memory_unless_told(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], kept: bool
) -> None:
    from vitlens_server import cli, host_memory

    calls: list[str] = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept") or True)

    async def no_serve(config: object) -> None:
        calls.append("served")

    monkeypatch.setattr(cli, "serve", no_serve)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--port", "0", *argv]) == 0
    assert calls == (["kept", "served"] if kept else ["served"])
