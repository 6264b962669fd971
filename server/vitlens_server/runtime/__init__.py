"""Workers that run model passes off the event loop."""

from vitlens_server.runtime.worker import ModelWorker, WorkerPool

__all__ = ["ModelWorker", "WorkerPool"]
