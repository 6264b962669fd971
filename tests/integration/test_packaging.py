"""The two distributions as built: the SDK `vitlens` (client/pyproject.toml) carries the client,
the CLI, the generated stubs and the .proto files, and nothing of the server; the server
`vitlens-server` (pyproject.toml) carries vitlens_server, the demo weights and the exemplar CLIP
folder, and nothing of the SDK. Each is built offline (no build isolation: the dev venv's
setuptools) from a copy of its tree, as an sdist and then a wheel *from that sdist*, so a file
the sdist lacks is missing from the wheel too. The SDK wheel is then installed into a fresh venv,
without torch.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("setuptools", reason="dev extra: setuptools builds the wheels")
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vitlens_server.models.default import SHIPPED_FOLDERS

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"torch", "torchvision", "timm", "safetensors", "numba", "prometheus-client"}
_BUILD = (
    "import sys\n"
    "from setuptools import build_meta\n"
    "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))\n"
)


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    names: frozenset[str]  # the wheel's file names

    def dist_info(self, name: str) -> str:
        (info,) = {n.split("/")[0] for n in self.names if n.split("/")[0].endswith(".dist-info")}
        with zipfile.ZipFile(self.wheel) as zf:
            path = f"{info}/{name}"
            return zf.read(path).decode() if path in self.names else ""

    def metadata(self) -> email.message.Message:
        return email.parser.Parser().parsestr(self.dist_info("METADATA"))

    def requires(self) -> list[Requirement]:
        return [Requirement(r) for r in self.metadata().get_all("Requires-Dist") or []]

    def top_level(self) -> set[str]:
        return {n.split("/")[0] for n in self.names if ".dist-info/" not in n}


def _ignore(_: str, names: list[str]) -> set[str]:
    return {n for n in names if n in {"__pycache__", "build", "dist"} or n.endswith(".egg-info")}


def _build(source: Path, out: Path) -> Built:
    """sdist of ``source``, then a wheel built from the unpacked sdist."""
    out.mkdir()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def backend(hook: str, cwd: Path, target: Path) -> Path:
        run = subprocess.run(
            [sys.executable, "-c", _BUILD, hook, str(target)],
            cwd=cwd, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        return target / run.stdout.strip().splitlines()[-1]

    sdist = backend("build_sdist", source, out)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4+
            tar.extractall(out / "unpacked", filter="data")
        else:
            tar.extractall(out / "unpacked")  # our own sdist
    (unpacked,) = (out / "unpacked").iterdir()
    wheel = backend("build_wheel", unpacked, out)
    with zipfile.ZipFile(wheel) as zf:
        names = frozenset(zf.namelist())
    return Built(sdist=sdist, wheel=wheel, names=names)


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("sdk")
    shutil.copytree(ROOT / "client", tmp / "src", ignore=_ignore)
    return _build(tmp / "src", tmp / "out")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "src").mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp / "src" / name)
    shutil.copytree(ROOT / "server", tmp / "src/server", ignore=_ignore)
    return _build(tmp / "src", tmp / "out")


def _sources(package: Path, base: Path) -> set[str]:
    """Every module and stub of a package tree, as wheel paths."""
    return {
        p.relative_to(base).as_posix()
        for p in package.rglob("*")
        if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    }


# --- the SDK ------------------------------------------------------------------------------


def test_sdk_wheel_has_the_client_the_stubs_and_nothing_of_the_server(sdk: Built) -> None:
    assert sdk.wheel.name.startswith("vitlens-0.2.0-py3-none-any")
    assert sdk.top_level() == {"vitlens"}
    missing = _sources(ROOT / "client/vitlens", ROOT / "client") - sdk.names
    assert not missing, f"not in the SDK wheel (a folder without __init__.py?): {missing}"
    assert {
        "vitlens/cli.py", "vitlens/py.typed",
        "vitlens/v1/vitlens_pb2.py", "vitlens/v1/vitlens_pb2.pyi", "vitlens/v1/vitlens_pb2_grpc.py",
        "vitlens/v1/tensor_pb2.py", "vitlens/v1/tensor_pb2.pyi",
    } <= sdk.names  # fmt: skip
    assert not [n for n in sdk.names if "vitlens_server" in n or n.endswith(".safetensors")]


def test_sdk_wheel_and_sdist_ship_the_protos_under_their_import_root(sdk: Built) -> None:
    for name in ("vitlens.proto", "tensor.proto"):
        shipped = f"vitlens/protos/vitlens/v1/{name}"
        assert shipped in sdk.names
        with zipfile.ZipFile(sdk.wheel) as zf:
            assert zf.read(shipped) == (ROOT / "protos/vitlens/v1" / name).read_bytes()
        with tarfile.open(sdk.sdist) as tar:
            assert f"vitlens-0.2.0/{shipped}" in tar.getnames()
    assert "vitlens/protos/__init__.py" in sdk.names


def test_sdk_metadata_needs_no_torch_and_installs_one_script(sdk: Built) -> None:
    meta = sdk.metadata()
    assert (meta["Name"], meta["Version"]) == ("vitlens", "0.2.0")
    requires = sdk.requires()
    always = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert always == {"grpcio", "protobuf", "numpy", "googleapis-common-protos"}
    cli = {canonicalize_name(r.name) for r in requires if r.marker is not None}
    assert cli == {"pillow", "matplotlib"} and meta.get_all("Provides-Extra") == ["cli"]
    assert not {canonicalize_name(r.name) for r in requires} & SERVER_ONLY
    entry_points = configparser.ConfigParser()
    entry_points.read_string(sdk.dist_info("entry_points.txt"))
    assert entry_points.sections() == ["console_scripts"]
    assert dict(entry_points["console_scripts"]) == {"vitlens": "vitlens.cli:main"}


# --- the server ---------------------------------------------------------------------------


def test_server_wheel_has_the_server_and_the_weights_and_not_the_sdk(server: Built) -> None:
    assert server.wheel.name.startswith("vitlens_server-0.2.0-py3-none-any")
    assert server.top_level() == {"vitlens_server"}
    missing = _sources(ROOT / "server/vitlens_server", ROOT / "server") - server.names
    assert not missing, f"not in the server wheel (a folder without __init__.py?): {missing}"
    for asset in (ROOT / "server/vitlens_server/assets").iterdir():
        if asset.suffix in {".safetensors", ".json"}:
            assert f"vitlens_server/assets/{asset.name}" in server.names
    assert "vitlens_server/assets/vitlens-demo.safetensors" in server.names
    # every shipped model folder (the exemplar CLIP, VQA models and detector): each file of it,
    # and the ones its spec requires; and no folder in assets/ that the list forgets
    assets = ROOT / "server/vitlens_server/assets"
    folders = {p.name for p in assets.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == set(SHIPPED_FOLDERS), folders ^ set(SHIPPED_FOLDERS)
    for folder, files in SHIPPED_FOLDERS.items():
        found = (ROOT / "server/vitlens_server/assets" / folder).iterdir()
        shipped = {f"vitlens_server/assets/{folder}/{p.name}" for p in found}
        required = {f"vitlens_server/assets/{folder}/{name}" for name in files}
        assert required <= shipped <= server.names, sorted((shipped | required) - server.names)
    # no console script: `vitlens` is the SDK's, two distributions must not both install it
    assert "console_scripts" not in server.dist_info("entry_points.txt")


def test_server_requires_the_sdk_at_its_own_version(server: Built, sdk: Built) -> None:
    meta = server.metadata()
    assert (meta["Name"], meta["Version"]) == ("vitlens-server", "0.2.0")
    requires = {canonicalize_name(r.name): r for r in server.requires() if r.marker is None}
    vitlens = requires["vitlens"]
    assert vitlens.extras == {"cli"} and str(vitlens.specifier) == f"=={sdk.metadata()['Version']}"
    assert SERVER_ONLY - {"torchvision"} <= requires.keys()
    assert {"tracing", "dev"} <= set(meta.get_all("Provides-Extra"))
    # the source tree declares the same (what `pip install ./client ./` reads)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"vitlens[cli]=={sdk.metadata()['Version']}" in declared["dependencies"][0]


# --- the SDK installed alone --------------------------------------------------------------


def _run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False,
        timeout=240,
    )  # fmt: skip


@pytest.mark.slow
def test_sdk_alone_in_a_fresh_venv(sdk: Built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin/python"
    # the dev venv's pip installs into it; the SDK's small dependencies come from the index
    pip = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--disable-pip-version-check", sdk.wheel, cwd=tmp_path,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-4000:]

    probe = (
        "import importlib.util, sys\n"
        "import vitlens, vitlens.cli, vitlens.aio, vitlens.protos\n"
        "assert 'torch' not in sys.modules\n"
        "print(importlib.util.find_spec('torch'), importlib.util.find_spec('vitlens_server'))\n"
        "print(vitlens.protos.ROOT)\n"
    )
    run = _run(python, "-I", "-c", probe, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    absent, root = run.stdout.splitlines()
    assert absent == "None None"  # neither torch nor the server is importable there
    root = Path(root)
    assert root.is_relative_to(venv)

    helped = _run(venv / "bin/vitlens", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "explain" in helped.stdout
    served = _run(venv / "bin/vitlens", "serve", "--port", "0", cwd=tmp_path)
    assert served.returncode == 2
    assert "pip install vitlens-server" in served.stderr, served.stderr

    # the installed .proto files compile from their import root (the dev venv's grpc_tools),
    # into exactly the committed generated code
    out = tmp_path / "gen"
    out.mkdir()
    protoc = _run(
        sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={out}",
        "vitlens/v1/vitlens.proto", "vitlens/v1/tensor.proto", cwd=tmp_path,
    )  # fmt: skip
    assert protoc.returncode == 0, protoc.stderr
    for name in ("vitlens_pb2.py", "tensor_pb2.py"):
        generated = (out / "vitlens/v1" / name).read_text()
        assert generated == (ROOT / "client/vitlens/v1" / name).read_text()
