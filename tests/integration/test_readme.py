"""README's "Calling the service" runs as written: its Python SDK block and its CLI lines, against
a live server, with the image files they name (the Node, buf curl and tritonclient commands are
run by test_any_language.py and tests/rpc/test_oip.py); so do the CLI lines of its image-text
(CLIP) subsection, against a server of the shipped exemplar `vitlens-clip`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import RunningServer, start_server

ROOT = Path(__file__).resolve().parents[2]
SCENE = ROOT / "examples/grpcurl/scene.png"  # a held-out generated scene (a disc)
README_ADDRESS = "localhost:50051"


def _section(title: str) -> str:
    """The README text under ``### title``, up to the next heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#)", text, flags=re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _block(section: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert match, f"no {language} block"
    return match.group(1)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The files the README's examples name, in a folder to run them from."""
    scene = Image.open(SCENE).convert("RGB")
    for name in ("cat.jpg", "dog.png", "scan1.png", "scan2.jpg"):
        scene.save(tmp_path / name)
    return tmp_path


def test_the_python_sdk_block_runs(server: RunningServer, images: Path) -> None:
    code = _block(_section("Python SDK"), "python")
    assert README_ADDRESS in code
    code = code.replace(README_ADDRESS, server.address)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=images, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["cat.jpg", "dog.png"]
    assert lines[0].split()[1] == "disc"  # the scene's class, predicted
    assert "'rollout'" in lines[-1] and "'generic'" in lines[-1]  # method_names


def test_the_cli_lines_run(server: RunningServer, images: Path) -> None:
    vitlens = shutil.which("vitlens", path=str(Path(sys.executable).parent))
    assert vitlens, "the vitlens command is not installed beside this interpreter"
    commands = [
        line.split("#")[0].strip()
        for line in _block(_section("CLI"), "bash").splitlines()
        if line.strip()
    ]
    assert len(commands) == 4
    env = {**os.environ, "VITLENS_SERVER": server.address}  # the lines that name no server
    for command in commands:
        argv = shlex.split(command.replace(README_ADDRESS, server.address))
        assert argv[0] == "vitlens"
        done = subprocess.run(
            [vitlens, *argv[1:]], cwd=images, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        expected = "vitlens-demo" if argv[1] == "models" else "disc"  # the scene's class
        assert expected in done.stdout, f"{command} printed:\n{done.stdout}"
    written = sorted(p.name for p in (images / "heatmaps").iterdir())
    assert any(n.startswith("scan1") and n.endswith(".png") for n in written), written
    assert any(n.startswith("scan2") and n.endswith(".json") for n in written), written


@pytest.fixture(scope="module")
def clip_server() -> RunningServer:
    from vitlens_server.cli import parse_model_spec
    from vitlens_server.config import ServerConfig
    from vitlens_server.models import ModelRegistry, load_model

    registry = ModelRegistry([load_model(parse_model_spec("vitlens-clip", "cpu"))])
    running, stop = start_server(ServerConfig(port=0), registry)
    yield running
    stop()


def test_the_clip_cli_lines_run(clip_server: RunningServer, images: Path) -> None:
    vitlens = shutil.which("vitlens", path=str(Path(sys.executable).parent))
    assert vitlens, "the vitlens command is not installed beside this interpreter"
    commands = [
        line.split("  #")[0].strip()
        for line in _block(_section("Image\u2013text models (CLIP)"), "bash").splitlines()
        if line.strip()
    ]
    assert [shlex.split(c)[:2] for c in commands] == [
        ["vitlens", "explain"], ["vitlens", "explain"], ["vitlens", "predict"],
    ]  # fmt: skip
    env = {**os.environ, "VITLENS_SERVER": clip_server.address}
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(
            [vitlens, *argv[1:]], cwd=images, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        if "--text" in argv:
            assert done.stdout.count("logit") == argv.count("--text"), done.stdout
        for prompt in (argv[i + 1] for i, a in enumerate(argv) if a == "--prompt"):
            assert prompt in done.stdout, done.stdout
    written = {p.name for p in (images / "clip").iterdir()}
    assert "scan1_0_a_photo_of_a_disc_tokens.png" in written, sorted(written)
    assert len([n for n in written if n.endswith("_tokens.png")]) == 2 + 2, sorted(written)
