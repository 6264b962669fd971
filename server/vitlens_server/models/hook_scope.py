"""Hooks that are on a model only while some recording uses them.

A recording owner (the ViT `AttentionHooks`, an image-text tower's `TowerHooks`, a bi-modal
model's `MapHooks`) declares its hooks once, when the model is loaded, as installers in a
`HookScope`, and wraps each recording in `HookScope.attached()`. The first recording to start
(in any thread) attaches them, the last to end removes them, under a lock; in between, passes of
threads that do not record run the hooks, which find no recording of theirs and keep nothing.
Every pass outside all recordings — Predict, a method's further passes — runs the bare model,
so the hooks cost nothing there (benchmarks/methods_roof measures Predict ÷ fused forward).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from torch import nn

__all__ = ["Handle", "HookScope"]


class Handle(Protocol):
    """What an installer returns for each thing it put on the model (a hook's
    ``RemovableHandle``, or any undo with ``remove()``)."""

    def remove(self) -> None: ...


Installer = Callable[[], Sequence[Handle]]


class HookScope:
    """Declared hooks, attached while at least one `attached()` block is open."""

    def __init__(self) -> None:
        self._installers: list[Installer] = []
        self._handles: list[Handle] = []
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    def add(self, install: Installer) -> None:
        """Declare hooks: ``install()`` registers them and returns their handles."""
        self._installers.append(install)

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs: object) -> None:
        """Declare ``module.register_forward_hook(hook, **kwargs)``."""
        self.add(lambda: [module.register_forward_hook(hook, **kwargs)])

    def pre_hook(self, module: nn.Module, hook: Callable, **kwargs: object) -> None:
        """Declare ``module.register_forward_pre_hook(hook, **kwargs)``."""
        self.add(lambda: [module.register_forward_pre_hook(hook, **kwargs)])

    @property
    def declared(self) -> int:
        """How many installers were declared."""
        return len(self._installers)

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks are on their modules inside the block (and while other blocks are open);
        after `close`, never: a recording then keeps nothing."""
        with self._lock:
            closed = self._closed
            if not closed and self._users == 0:
                handles: list[Handle] = []
                try:
                    for install in self._installers:
                        handles += install()
                except BaseException:
                    for handle in handles:
                        handle.remove()
                    raise
                self._handles = handles
            if not closed:
                self._users += 1
        try:
            yield
        finally:
            with self._lock:
                if not closed and not self._closed:
                    self._users -= 1
                    if self._users == 0:
                        self._remove()

    def close(self) -> None:
        """Remove the hooks now, even while blocks are open (the model is being unloaded); no
        block attaches them after."""
        with self._lock:
            self._remove()
            self._closed = True

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
