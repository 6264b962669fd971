"""Forward hooks that capture every declared attention map of a bi-modal model.

One hook per attention ``nn.Dropout`` named by the graph's edge labels (`graphs`): its output is
the edge's map A (B, h, q, k). A module labelled on several edges (LXMERT's shared co-attention)
fills them in call order. The hooks are declared once per loaded model and are on the modules
only while some thread records (`MapHooks.record`, a `vitlens_server.models.hook_scope.HookScope`:
Predict runs the bare model); `MapHooks.close` removes them all.

When the pass builds a graph but nothing before a map requires grad (the frozen weights never
do, and LXMERT's language encoder never sees the image inputs), the hook hands the model an
alias of A that does: ∂y/∂A then exists for every map, and ``torch.autograd.grad`` never touches
a parameter's ``.grad``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from vitlens_server.explain.graph.declare import AttentionGraph
from vitlens_server.models.bimodal.records import BimodalRecording
from vitlens_server.models.hook_scope import HookScope

__all__ = ["MapHooks"]


class MapHooks:
    """Recording hooks on the attention modules of every edge of ``graph``."""

    def __init__(self, graph: AttentionGraph, model: nn.Module) -> None:
        """Hook ``model.get_submodule(edge.label)`` for every edge.

        Raises:
            AttributeError: a label names no submodule of ``model``.
            TypeError: it names a module that is not an ``nn.Dropout``.
        """
        self.graph = graph
        self._local = threading.local()  # .recording: this thread's active recording
        self._scope = HookScope()
        calls: dict[str, list[int]] = {}  # path → its edges, in call order
        for index, edge in enumerate(graph.edges):
            calls.setdefault(edge.label, []).append(index)
        for path, edges in calls.items():
            module = model.get_submodule(path)
            if not isinstance(module, nn.Dropout):
                raise TypeError(f"{path} is a {type(module).__name__}, not the attention dropout")
            self._scope.forward_hook(module, _map_hook(self, tuple(edges)))

    @property
    def active(self) -> BimodalRecording | None:
        """The recording of the calling thread, or None when it is not recording."""
        return getattr(self._local, "recording", None)

    @property
    def num_hooks(self) -> int:
        """Hooks declared (one per hooked module); on the model only while recording."""
        return self._scope.declared

    @contextmanager
    def record(self) -> Iterator[BimodalRecording]:
        """Capture, for this thread, the maps of the one forward pass inside the block."""
        if self.active is not None:
            raise RuntimeError("a recording of this model is already active in this thread")
        recording = BimodalRecording(self.graph)
        with self._scope.attached():
            self._local.recording = recording
            try:
                yield recording
            finally:
                self._local.recording = None

    def close(self) -> None:
        """Remove every hook."""
        self._scope.close()


def _map_hook(
    hooks: MapHooks, edges: tuple[int, ...]
) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    """A forward hook on an attention dropout: records its output (B, h, q, k) as the next of
    ``edges``, returning the anchored alias where one was made. (A closure, not a bound method,
    so that copying the model never copies the hooks' thread-local state.)"""

    def on_map(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
        rec = hooks.active
        if rec is None:
            return None
        kept = rec.capture(edges, output)
        return None if kept is output else kept

    return on_map
