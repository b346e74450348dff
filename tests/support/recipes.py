"""Test helper: the fenced blocks of a Markdown page, and what the recipe tests do with each.

The convention the pages follow (visible in their source, so nothing is skipped silently):

- ``<!-- file: PATH -->`` on the line before a block: the block is the content of PATH (relative to the recipe's
  working directory), written there when its turn comes.
- ``<!-- not run: REASON -->``: the block is not run; its test is skipped with that reason.
- ``<!-- needs: PROGRAM -->``: run only where PROGRAM is on the PATH (skipped with that reason elsewhere).
- Otherwise a ``sh`` block runs in bash (``-e``) and a ``python`` block with the project's venv python. A block
  of any other kind without one of the comments above is an error, so a new block cannot go untested unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
NOTE = re.compile(r"^\s*<!--\s*(?P<kind>file|not run|needs):\s*(?P<value>.*?)\s*-->\s*$")
RUNNABLE = {"sh", "python"}


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its info string, its text and the comment before it (if any)."""

    page: str
    line: int
    info: str
    text: str
    note_kind: str = ""
    note_value: str = ""

    @property
    def id(self) -> str:
        """The test id: page, line, kind and whether it runs."""
        how = "not-run" if self.note_kind == "not run" else ("file" if self.note_kind == "file" else "run")
        return f"{self.page}:{self.line}:{self.info or 'text'}:{how}"

    @property
    def rule_error(self) -> str | None:
        """Why the block breaks the convention, or None."""
        if self.note_kind in ("file", "not run"):
            return None if self.note_value else f"{self.id}: empty <!-- {self.note_kind}: --> comment"
        if self.info not in RUNNABLE:
            return f"{self.id}: a {self.info or 'plain'} block needs <!-- file: PATH --> or <!-- not run: REASON -->"
        return None


def blocks(path: Path, page: str) -> list[Block]:
    """Every fenced block of the Markdown file at ``path``, in order (``page`` names it in test ids).

    Raises ValueError on a fence that is never closed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = len(opening["indent"])
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: fence never closed")
        text = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        note = NOTE.match(before)
        found.append(Block(page, i + 1, opening["info"].strip(), text,
                           note["kind"] if note else "", note["value"] if note else ""))
        i = end + 1
    return found
