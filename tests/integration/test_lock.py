"""requirements/server.lock and the Dockerfiles that install from it: every pin hashed, every
runtime dependency of the two distributions locked at a version they accept, torch alone left
to the images' own pinned layer, and no hadolint exception needed.

Docker cannot run here (no daemon): these read the files; `requirements/lock.sh` regenerates
the lock (it needs PyPI).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements/server.lock"
DOCKERFILES = sorted((ROOT / "deploy/docker").glob("Dockerfile*"))
DOCKERFILES = [p for p in DOCKERFILES if not p.name.endswith(".dockerignore")]
# Installed by the Dockerfiles before the lock, pinned by version from the PyTorch index of the
# build, with the packages only that build brings (CUDA libraries, triton).
TORCH_BUILD = {"torch", "torchvision"}
TORCH_BUILD_EXTRAS = re.compile(r"^(triton|nvidia-.+|cuda-.+)$")
LOCAL = {"vitlens", "vitlens-server"}  # this checkout's distributions, installed --no-deps
# What the build context must let in (Dockerfile*.dockerignore) for the three pip installs.
IMAGE_INPUTS = [
    "!requirements/server.lock",
    "!pyproject.toml",
    "!README.md",
    "!client/",
    "!server/",
]
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


def _logical_lines(text: str) -> list[str]:
    """Lines with their backslash continuations joined, comments and blanks dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def _lock() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every requirement in the lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in _logical_lines(LOCK.read_text()):
        spec, *options = line.split()
        assert not spec.startswith("-"), f"options in the lock: {line[:80]}"
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", spec)
        assert match, f"not an exact pin: {spec}"
        name = canonicalize_name(match[1])
        assert name not in entries, f"{name} pinned twice"
        entries[name] = (match[2], options)
    return entries


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def _runtime_requirements() -> list[Requirement]:
    """What installing the images' `vitlens-server[tracing]` pulls in: its dependencies, the
    tracing extra's (so the images can `--tracing`) and, through `vitlens[...]`, the SDK's
    dependencies and the extras asked for."""
    server, sdk = _project(ROOT / "pyproject.toml"), _project(ROOT / "client/pyproject.toml")
    found = []
    for text in [*server["dependencies"], *server["optional-dependencies"]["tracing"]]:
        req = Requirement(text)
        if canonicalize_name(req.name) == "vitlens":
            found += [Requirement(t) for t in sdk["dependencies"]]
            for extra in sorted(req.extras):
                found += [Requirement(t) for t in sdk["optional-dependencies"][extra]]
        else:
            found.append(req)
    return found


def _dockerfile_runs(path: Path) -> list[str]:
    return [line for line in _logical_lines(path.read_text()) if line.startswith("RUN ")]


def test_every_pin_in_the_lock_has_sha256_hashes() -> None:
    entries = _lock()
    assert len(entries) > 20, "the lock looks empty"
    for name, (version, options) in entries.items():
        assert options, f"{name}=={version} has no --hash"
        assert all(HASH.match(o) for o in options), f"{name}: {options[:2]}"


def test_the_lock_covers_every_runtime_dependency_at_a_version_allowed() -> None:
    entries = _lock()
    requirements = _runtime_requirements()
    names = {canonicalize_name(r.name) for r in requirements}
    assert {"grpcio", "numpy", "timm", "pillow", "torch", "opentelemetry-sdk"} <= names
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in TORCH_BUILD:
            continue
        assert name in entries, f"{req} is a runtime dependency but not in {LOCK.name}"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {name}=={version}, outside {req}: run requirements/lock.sh"
        )


def test_the_lock_leaves_out_exactly_the_torch_build() -> None:
    entries = _lock()
    assert not (TORCH_BUILD | LOCAL) & entries.keys()
    assert not [n for n in entries if TORCH_BUILD_EXTRAS.match(n)]
    # torch's own pure-Python dependencies are locked (the images check them with pip check)
    assert {"sympy", "jinja2", "filelock", "networkx"} <= entries.keys()


def test_dockerfiles_install_torch_then_the_lock_then_the_local_packages() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda"}
    pins = re.search(r"^TORCH_PINS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pins, "TORCH_PINS not found in the Makefile"
    make_pins = dict(p.split("==") for p in pins[1].split())
    for path in DOCKERFILES:
        text = path.read_text()
        assert "hadolint ignore" not in text, f"{path.name}: inline hadolint exception"
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        assert args["TORCH_VERSION"] == make_pins["torch"], path.name
        assert args["TORCHVISION_VERSION"] == make_pins["torchvision"], path.name
        copied = re.search(r"^COPY requirements/server\.lock (\S+)$", text, re.M)
        assert copied, f"{path.name} does not copy requirements/server.lock"
        installs = [r for r in _dockerfile_runs(path) if "pip install" in r]
        assert len(installs) == 3, f"{path.name}: expected three pip installs, {installs}"
        torch, lock, local = installs
        assert "--index-url" in torch
        assert '"torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"' in torch
        assert {"--require-hashes", "--no-deps"} <= set(lock.split()), lock
        assert f"-r {copied[1]}" in lock, lock
        tokens = local.split()
        assert {"--no-deps", "--no-build-isolation", "./client", "./"} <= set(tokens), local
        assert "pip check" in local, f"{path.name}: the installed set is not checked"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerignore_sends_the_lock_and_the_two_distributions(name: str) -> None:
    lines = (ROOT / f"deploy/docker/{name}.dockerignore").read_text().splitlines()
    assert "*" in lines  # everything is left out, then the image's inputs are let in
    assert set(IMAGE_INPUTS) <= set(lines)
