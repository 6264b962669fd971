"""Waiting for a condition the server updates on its own threads: polled, bounded, never a
fixed sleep standing in for synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for"]


def wait_for(
    condition: Callable[[], Any],
    timeout_s: float = 30.0,
    *,
    describe: Callable[[], object] | None = None,
) -> None:
    """Return once ``condition()`` is true; fail after ``timeout_s`` with ``describe()`` (what
    was seen instead) or "condition not reached"."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, describe() if describe else "condition not reached"
        time.sleep(0.005)
