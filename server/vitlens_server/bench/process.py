"""`vitlens serve` as a child process on a free loopback port, for the benchmark scripts.

    with ServeProcess.start(["--cache-mb", "0"], log=Path("serve.log")) as server:
        server.wait_serving(timeout_s=600)
        ...  # call server.address

The child runs this interpreter with this checkout's packages on its path (installed or not),
is polled on grpc.health.v1 until SERVING (failing early, with its log, if it exits), and is
stopped with SIGTERM (a graceful drain), then SIGKILL if it is still there after a minute.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import vitlens
import vitlens_server

__all__ = ["ServeProcess", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    """A running `vitlens serve`: ``address`` (host:port) and its combined output in ``log``."""

    address: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, flags: Sequence[str], *, log: Path) -> ServeProcess:
        """`vitlens serve FLAGS --host 127.0.0.1 --port <free>`, its output appended to ``log``."""
        port = free_port()
        argv = [sys.executable, "-m", "vitlens_server", *flags]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        env = dict(os.environ)
        packages = {str(Path(p.__file__).resolve().parents[1]) for p in (vitlens, vitlens_server)}
        env["PYTHONPATH"] = os.pathsep.join([*sorted(packages), env.get("PYTHONPATH", "")])
        with log.open("ab") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        return cls(f"127.0.0.1:{port}", process, log)

    def wait_serving(self, timeout_s: float) -> None:
        """Poll grpc.health.v1 until SERVING (models loaded and warmed up).

        Raises:
            RuntimeError: the process exited (the message ends with its log).
            TimeoutError: not SERVING within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        request = health_pb2.HealthCheckRequest(service="")
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"vitlens serve exited during startup:\n{tail}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"vitlens serve not SERVING after {timeout_s:g} s")
                try:
                    # wait_for_ready blocks until the port accepts connections (or the slice ends)
                    reply = stub.Check(request, timeout=min(2.0, remaining), wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError as err:
                    if err.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise

    def stop(self) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it is still there after 60 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
