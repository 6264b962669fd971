"""HookScope: hooks attached by the first open block, removed by the last, never after close."""

from __future__ import annotations

import pytest
from torch import nn

from vitlens_server.models.hook_scope import HookScope


def _count(module: nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_the_first_block_attaches_and_the_last_removes() -> None:
    module = nn.Linear(2, 2)
    scope = HookScope()
    scope.forward_hook(module, lambda *_: None)
    scope.pre_hook(module, lambda *_: None)
    assert scope.declared == 2 and _count(module) == 0 and not scope.is_attached
    outer = scope.attached()
    outer.__enter__()
    assert _count(module) == 2 and scope.is_attached
    with scope.attached():
        assert _count(module) == 2  # a second user shares them
    assert _count(module) == 2  # the first is still open
    outer.__exit__(None, None, None)
    assert _count(module) == 0
    with scope.attached():
        assert _count(module) == 2  # attached again for a later block


def test_a_failing_installer_leaves_no_hook_behind() -> None:
    module = nn.Linear(2, 2)
    scope = HookScope()
    scope.forward_hook(module, lambda *_: None)

    def broken() -> list:
        raise TypeError("this layout has no such submodule")

    scope.add(broken)
    with pytest.raises(TypeError, match="no such submodule"), scope.attached():
        pass
    assert _count(module) == 0 and not scope.is_attached


def test_close_removes_the_hooks_even_inside_a_block_and_for_good() -> None:
    module = nn.Linear(2, 2)
    scope = HookScope()
    scope.forward_hook(module, lambda *_: None)
    with scope.attached():
        scope.close()
        assert _count(module) == 0
    with scope.attached():
        assert _count(module) == 0
