"""Figures tests want shown in the terminal summary (printed by conftest's hook)."""

from __future__ import annotations

REPORT: dict[str, list[str]] = {}


def report(section: str, line: str) -> None:
    """Add ``line`` under ``section`` in the end-of-run summary."""
    REPORT.setdefault(section, []).append(line)
