"""The result cache: LRU order, byte bound, key hygiene."""

from __future__ import annotations

import pytest

from vitlens_server.runtime.cache import ResultCache, cache_key


def test_lru_evicts_the_least_recently_used_within_the_byte_bound() -> None:
    cache = ResultCache(max_bytes=10)
    cache.put(b"a", "A", 4)
    cache.put(b"b", "B", 4)
    assert cache.get(b"a") == "A"  # a is now the most recent
    cache.put(b"c", "C", 4)  # 12 bytes > 10: evict b
    assert cache.get(b"b") is None and cache.get(b"a") == "A" and cache.get(b"c") == "C"
    assert cache.bytes == 8 and len(cache) == 2


def test_replacing_and_oversized_values() -> None:
    cache = ResultCache(max_bytes=4)
    cache.put(b"k", "short", 2)
    cache.put(b"k", "long", 4)
    assert cache.bytes == 4 and cache.get(b"k") == "long"
    cache.put(b"big", "huge", 5)  # larger than the cache: not stored, nothing evicted
    assert cache.get(b"big") is None and cache.get(b"k") == "long"
    assert not ResultCache(0).enabled
    with pytest.raises(ValueError):
        ResultCache(-1)


def test_keys_are_sha256_of_length_prefixed_parts() -> None:
    assert len(cache_key("model", b"image")) == 32
    assert cache_key("ab", "c") != cache_key("a", "bc")  # no ambiguity from concatenation
    assert cache_key("x", b"y") == cache_key(b"x", "y")
