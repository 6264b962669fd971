"""Result cache: encoded per-image explanations, LRU, bounded in bytes.

Keys are SHA-256 digests of everything that determines an image's explanation — the model and
its weights version, the image's bytes, the method, the class explained for that image and the
output options — so a hit is byte-for-byte the answer a computation would give. Values are the
serialized `ImageExplanation` messages (without the caller's id), so their size is exact.
Used from the event loop only (no locking). Never imports torch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

__all__ = ["ResultCache", "cache_key"]


def cache_key(*parts: bytes | str) -> bytes:
    """SHA-256 over length-prefixed parts (so no two different part lists collide by joining)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class ResultCache:
    """Least-recently-used map of key → bytes holding at most ``max_bytes`` of values."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value``; a value larger than the whole cache is not stored."""
        if len(value) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)
            self.evictions += 1
