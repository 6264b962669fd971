"""Logging: plain text or one JSON object per line, every record tagged with its request id.

The RPC layer sets `request_id` for the duration of a call (the caller's ``x-request-id``
metadata, or a fresh id it echoes back), so every log line a request causes can be found.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

__all__ = ["configure_logging", "request_id"]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", "exception"}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Root logging for `vitlens serve`: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestId())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(request_id)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
