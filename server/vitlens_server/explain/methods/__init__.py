"""Explanation methods; importing this package registers them all in `METHODS`."""

from vitlens_server.explain.methods import attention, gradient

__all__ = ["attention", "gradient"]
