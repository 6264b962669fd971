"""Result cache: per-image explanations, LRU, bounded in bytes.

Keys are SHA-256 digests of everything that determines an image's explanation — the model and
its weights version, the image's content, the method and its options, the class explained for
that image and the output options — so a hit is exactly the answer a computation would give.
Values are B = 1 `ExplainResult`s (never mutated), sized by their arrays' bytes.
Used from the event loop only (no locking). Never imports torch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["ResultCache", "cache_key"]

V = TypeVar("V")


def cache_key(*parts: bytes | str) -> bytes:
    """SHA-256 over length-prefixed parts (so no two different part lists collide by joining)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class ResultCache(Generic[V]):
    """Least-recently-used map of key → value holding at most ``max_bytes`` of values."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: V, nbytes: int) -> None:
        """Store ``value`` of ``nbytes`` bytes; a value larger than the whole cache is not."""
        if nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = value, nbytes
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
