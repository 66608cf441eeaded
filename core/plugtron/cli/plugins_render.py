"""Plain-text rendering of ``plugtron plugins`` for a terminal of any width down to 80 columns.

One block per plugin instead of a table: a table with seven columns has to
break names mid-word below ~150 columns, while a block only wraps lists at
their commas, so every plugin, family, spec, converter and hook name stays
whole and can be copied or searched for. Standard library only: listing
plugins must stay fast and never import torch.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, Iterable

#: Narrower than this, wrapping makes every item its own line; nothing is gained.
MIN_WIDTH = 40
INDENT = "  "


def terminal_width() -> int:
    """``COLUMNS`` when set (tests, pipes), else the terminal's width, else 80."""
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def _wrap(text: str, width: int, first: str, rest: str, *, prose: bool = False) -> list[str]:
    """Wrap at spaces only: names contain hyphens and colons that must not become line ends.

    ``prose`` (error messages) may split a word longer than a whole line, so
    no line outgrows the terminal; names are never split.
    """
    return textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=rest,
        break_long_words=prose, break_on_hyphens=False,
    ) or [first.rstrip()]


def _field(label: str, items: Iterable[str], width: int) -> list[str]:
    """``  label: a, b, c`` wrapped at the commas, continuation lines aligned under the first item."""
    items = list(items)
    if not items:
        return []
    first = f"{INDENT}{label}: "
    return _wrap(", ".join(items), width, first, " " * len(first))


def _header(row: dict[str, Any], width: int) -> list[str]:
    origin = " ".join(part for part in (row["distribution"], row["version"]) if part) or row["source"]
    status = row["status"] if row["source"] != "builtin" else f"{row['status']} (builtin)"
    return _wrap(f"{row['name']}  {origin}  {status}", width, "", INDENT * 2)


def _spec_lines(specs: list[dict[str, Any]], width: int) -> list[str]:
    """Specs grouped by family, best first; with ``--check`` one line per spec with its verdict."""
    if not specs:
        return []
    specs = sorted(specs, key=lambda s: -s["priority"])
    if "available" not in specs[0]:
        lines = []
        for family in dict.fromkeys(s["family"] for s in specs):
            names = [s["name"] for s in specs if s["family"] == family]
            lines += _field(f"layer specs for {family}", names, width)
        return lines
    lines = [f"{INDENT}layer specs, best first:"]
    for spec in specs:
        verdict = "available" if spec["available"] else "unavailable"
        text = f"{spec['family']}: {spec['name']} - {verdict}: {spec['reason']}"
        lines += _wrap(text, width, INDENT * 2, INDENT * 4)
    return lines


def render_plugin(row: dict[str, Any], width: int) -> list[str]:
    """The block of one plugin; a failed plugin shows its error as wrapped plain text."""
    lines = _header(row, width)
    lines += _field("families", row["families"], width)
    lines += _spec_lines(row["layer_specs"], width)
    lines += _field("converters", row["converters"], width)
    lines += _field("hooks", row["hooks"], width)
    if row["error"]:
        lines += _wrap(f"error: {row['error']}", width, INDENT, INDENT * 2, prose=True)
    return lines


def render(data: dict[str, Any], width: int | None = None) -> str:
    """The whole listing: a summary line, one block per plugin, then warnings and the error."""
    width = max(MIN_WIDTH, width or terminal_width())
    rows = data["plugins"]
    loaded = sum(row["status"] == "loaded" for row in rows)
    lines = [f"plugtron plugins: {loaded} of {len(rows)} loaded", ""]
    for row in rows:
        lines += render_plugin(row, width) + [""]
    for warning in data.get("warnings") or []:
        lines += _wrap(f"warning: {warning}", width, "", INDENT, prose=True)
    if data["error"]:
        lines += _wrap(f"error: {data['error']}", width, "", INDENT, prose=True)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)
