"""Markdown for reports: tables, and counts and times as people read them."""

from __future__ import annotations

from typing import Any


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def table(head: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table: the one writer behind every table of the report, the README
    and docs. ``align`` has one letter per column (l, r, c; default: all right)."""
    align = align or "r" * len(head)
    if len(align) != len(head) or any(len(row) != len(head) for row in rows):
        raise ValueError(f"a table of {len(head)} columns got align {align!r} and rows of {[len(r) for r in rows]}")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def si(count: float | None) -> str:
    """A large count in engineering notation: 2.59 M, 188 M, 1.2 G."""
    if count is None:
        return "n/a"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.3g} {suffix}"
    return f"{count:g}"
