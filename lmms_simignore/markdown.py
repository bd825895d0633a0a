"""The one Markdown table writer of the package (sweeps, leaderboard, main job, bench, redundancy)."""

from __future__ import annotations


def table(header: list[str], rows: list[list], align: str = "") -> str:
    """A Markdown table: the `header` cells, then one line per row (cells through `str`).

    align: one letter per column, "l" (left, the default for missing letters) or "r" (right: numbers).
    """
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells; got {sorted({len(row) for row in rows})}")
    if set(align) - {"l", "r"}:
        raise ValueError(f"align takes 'l' and 'r' letters, got {align!r}")
    rule = ["---:" if letter == "r" else "---" for letter in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
