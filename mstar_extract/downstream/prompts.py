"""Class prompts in mSTAR's official zero-shot format, and a labels CSV.

A prompt file (JSON) is what the official ``zeroshot_classification/prompts/*_prompts_all_per_class.json`` hold::

    {"0": {"classnames": {"tumor": ["metastatic cancer", "tumor"], "normal": ["normal", "non-metastatic"]},
           "templates": ["CLASSNAME.", "an H&E image of CLASSNAME.", ...]}}

(the outer ``"0"`` may be left out). Each key of ``classnames`` is a class label; its value lists the names of
that class (a single string is one name); each template holds ``CLASSNAME``. Classes keep the file's order (the
official script orders them by its per-task label map instead; the scores do not depend on the order).

A labels file is a CSV with a ``slide_id`` column and a label column (``label`` by default) whose values are
class labels of the prompt file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from mstar_extract.errors import UsageError

PLACEHOLDER = "CLASSNAME"


@dataclass(frozen=True)
class Prompts:
    """Class labels in order, the names of each class, and the templates."""

    classes: list[str]
    names: dict[str, list[str]]
    templates: list[str]

    def texts(self, label: str, name: str) -> list[str]:
        """Every template filled with one name of a class (one text per template)."""
        return [t.replace(PLACEHOLDER, name) for t in self.templates]


def read_prompts(path: str | Path) -> Prompts:
    """Read and check a prompt file; UsageError (one line naming the file) when it is not usable."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{p}: prompt file not found") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{p}: not a readable JSON prompt file ({exc})") from None
    if isinstance(doc, dict) and "classnames" not in doc and isinstance(doc.get("0"), dict):
        doc = doc["0"]
    if not isinstance(doc, dict) or not isinstance(doc.get("classnames"), dict) or not isinstance(doc.get("templates"), list):
        raise UsageError(f"{p}: expected {{\"0\": {{\"classnames\": {{label: [names]}}, \"templates\": [...]}}}}")
    names = {str(k): ([v] if isinstance(v, str) else [str(x) for x in v]) for k, v in doc["classnames"].items()}
    templates = [str(t) for t in doc["templates"]]
    if len(names) < 2:
        raise UsageError(f"{p}: needs at least two classes, found {len(names)}")
    empty = [k for k, v in names.items() if not v]
    if empty:
        raise UsageError(f"{p}: class {empty[0]!r} has no names")
    if not templates or any(PLACEHOLDER not in t for t in templates):
        bad = next((t for t in templates if PLACEHOLDER not in t), None)
        raise UsageError(f"{p}: " + (f"template {bad!r} has no {PLACEHOLDER}" if templates else "no templates"))
    return Prompts(list(names), names, templates)


def read_labels(path: str | Path, column: str = "label") -> dict[str, str]:
    """``{slide_id: label}`` of a labels CSV; UsageError for a missing file or column, or a repeated slide id."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"{p}: cannot read the labels file ({exc.strerror or exc})") from None
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    cols = [c.strip() for c in reader.fieldnames or []]
    for need in ("slide_id", column):
        if need not in cols:
            raise UsageError(f"{p}: labels need a '{need}' column (has: {', '.join(cols)})")
    out: dict[str, str] = {}
    for lineno, row in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        sid = row["slide_id"]
        if sid in out:
            raise UsageError(f"{p}: line {lineno}: slide_id '{sid}' appears twice")
        if sid:
            out[sid] = row[column]
    return out
