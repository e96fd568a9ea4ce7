"""House rules that a reader cannot see at a glance, checked on the package's source: no function longer than
about a screen, and no citation of a document that is not in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mstar_extract

PACKAGE = Path(mstar_extract.__file__).resolve().parent
MAX_FUNCTION_LINES = 60
NOT_YET: set[str] = set()
"""Top-level parts of the package not checked yet (none: every part is)."""
KNOWN_LONG: set[tuple[str, str]] = set()
"""(file, function) pairs still over the limit, each with the reason (none)."""


def _sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in NOT_YET]


def function_lengths() -> list[tuple[int, str, str]]:
    """(lines, file relative to the package, function name), longest first."""
    rows = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                rows.append((node.end_lineno - node.lineno + 1, path.relative_to(PACKAGE).as_posix(), node.name))
    return sorted(rows, reverse=True)


def test_no_function_is_longer_than_a_screen() -> None:
    rows = function_lengths()
    assert rows, "no source found"
    too_long = [r for r in rows if r[0] > MAX_FUNCTION_LINES and (r[1], r[2]) not in KNOWN_LONG]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {too_long}"
    print("longest:", rows[:5])


def test_no_citation_of_documents_outside_the_repository() -> None:
    cited = [(p.relative_to(PACKAGE).as_posix(), n) for p in _sources()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(r"design §\d", line)]
    assert not cited, f"cite docs/architecture.md or the owning module instead: {cited}"
