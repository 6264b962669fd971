"""The benchmark scripts' ``--return-freed-memory``: host malloc as `vitlens serve` runs it, or not.

add_malloc_flag(parser)
args = parser.parse_args()
env += f", host malloc {apply_malloc_flag(args)}"
"""

from __future__ import annotations

import argparse

from vitlens_server.host_memory import keep_freed_memory

__all__ = ["add_malloc_flag", "apply_malloc_flag"]


def add_malloc_flag(parser: argparse.ArgumentParser, help_extra: str = "") -> None:
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="glibc malloc's defaults instead of vitlens serve's (host_memory)" + help_extra,
    )


def apply_malloc_flag(args: argparse.Namespace) -> str:
    """Keep freed memory unless ``args.return_freed_memory``, as `vitlens serve` does; says which
    in words for a report."""
    if args.return_freed_memory:
        return "at glibc's defaults"
    kept = keep_freed_memory()
    return "keeping freed memory (as vitlens serve)" if kept else "as this C library has it"
