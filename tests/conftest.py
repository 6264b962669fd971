"""Shared fixtures: a real vitlens server on loopback, run in a background event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.report import REPORT
from tests.tiny import tiny_loaded
from vitlens_server.app import VitlensServer
from vitlens_server.config import ServerConfig
from vitlens_server.host_memory import keep_freed_memory
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models.default import demo_spec

keep_freed_memory()  # the servers below run in this process, as `vitlens serve` runs them


@dataclass
class RunningServer:
    address: str
    server: VitlensServer
    loop: asyncio.AbstractEventLoop


def start_server(config: ServerConfig, registry: ModelRegistry) -> tuple[RunningServer, callable]:
    """Start a server on its own thread; returns it and a function that stops it."""
    loop = asyncio.new_event_loop()
    server = VitlensServer(config, registry)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as err:
            failure.append(err)
            return
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="vitlens-test-server", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    return RunningServer(f"127.0.0.1:{server.port}", server, loop), stop


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The embedded demo model (default) and a tiny 32 px model named "tiny"."""
    config = ServerConfig(port=0, max_pixels=1_000_000, max_images_per_request=8, max_batch_size=4)
    registry = ModelRegistry([load_model(demo_spec()), tiny_loaded(seed=11)])
    running, stop = start_server(config, registry)
    yield running
    stop()


@pytest.fixture
def client(server: RunningServer):
    import vitlens

    with vitlens.Client(server.address, timeout_s=60) as c:
        yield c


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures tests recorded with `tests.report.report`."""
    for section, lines in REPORT.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.line(line)
