"""Explanation methods; importing this package registers them all in `METHODS`."""

from vitlens_server.explain.methods import attention, cam, gradient, saliency

__all__ = ["attention", "cam", "gradient", "saliency"]
