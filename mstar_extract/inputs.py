"""Turn the SLIDES arguments of the command line into a sorted list of slides (docs/architecture.md, step 1).

A spec may be:

- a slide file (any name; an unknown extension fails later, per slide, when it is opened);
- a directory: searched recursively for known slide extensions (``slides.SLIDE_EXTENSIONS``), skipping hidden
  files and folders (names starting with ``.``, which includes this tool's own ``.<name>.*.tmp`` temp files);
  symbolic links are followed, but every real folder is searched once (a link loop such as ``ln -s . d/x`` ends),
  a file reached by several paths (a link to a slide beside it) is one slide under its link-free path, and a
  broken link with a slide name is a slide that fails with "file not found" (:mod:`mstar_extract.discover`);
  multi-file formats are one slide each: the ``.dcm`` files of one DICOM WSI series (its label, overview and
  thumbnail instances included) are one slide, a MIRAX ``X.mrxs`` is one slide whose data folder ``X/`` is
  not searched, and the JPEG files that a Hamamatsu ``X.vms`` lists are its parts, not slides
  (:mod:`mstar_extract.slides.formats`);
- a glob pattern (``*``, ``?``, ``[``; ``**`` recurses, visiting each real folder once as above): matching slide
  files, and directories searched as above;
- a list file ``*.csv`` / ``*.tsv`` / ``*.txt``: CSV with a header holding a ``path`` column and optional
  ``slide_id`` and ``mpp`` columns (tab-separated when the header has tabs), or — for ``.txt`` without a
  ``path`` header — one path per line; relative paths are relative to the list file's folder;
- ``-``: the same list format read from stdin (paths relative to the current directory).

In lists, blank lines and lines starting with ``#`` are ignored. The slide id is the file name without its
slide extension (``a.ome.tif`` -> ``a``) unless the list gives one; for DICOM, any file of a series (or a
folder holding one series) names the series, whose id is the folder's name when the folder holds one series
(rule for several: :mod:`mstar_extract.slides.dicom`). A SLIDES argument that does not exist (not a glob
pattern) is a usage error before any work; a path inside a list that does not exist becomes an entry with
``error`` set (a per-slide failure later, not a crash). The same file named twice is kept once;
two different files with the same id raise :class:`UsageError` naming both, before any work.

Slide ids name output files, so each is checked here (:func:`mstar_extract.store.layout.slide_id_problem`: no
path separators, no ``..``, no leading dot, no control characters, not empty, at most 200 characters); a bad
one is a :class:`UsageError` naming the list row (or the file), before any work.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from mstar_extract.discover import file_key, glob_slides, missing_reason, one_path_per_file, scan_dir
from mstar_extract.errors import UsageError
from mstar_extract.slides.formats import is_slide_file, slide_identity
from mstar_extract.store.layout import validate_slide_id

log = logging.getLogger("mstar")

LIST_EXTENSIONS = frozenset({".csv", ".tsv", ".txt"})
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: its id, path, optional per-slide mpp (from a list) and a pre-open error."""

    slide_id: str
    path: Path
    mpp: float | None = None
    error: str | None = None


class SlideRef(Protocol):
    """What names one slide in an outcome: a :class:`SlideEntry`, or the outcome of an earlier step."""

    @property
    def slide_id(self) -> str: ...

    @property
    def path(self) -> str | os.PathLike[str]: ...


def _is_hidden(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (path.name,)
    return any(p.startswith(".") for p in parts)


def _parse_mpp(value: str | None, where: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise UsageError(f"{where}: mpp '{value}' is not a number") from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"{where}: mpp must be a positive number of µm per pixel, got '{value}'")
    return mpp


def _content_lines(text: str) -> list[tuple[int, str]]:
    return [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip() and not ln.lstrip().startswith("#")]


def parse_list(text: str, base: Path, source: str, force_csv: bool = False) -> list[SlideEntry]:
    """Parse a slide list (CSV with a ``path`` header, or one path per line) from ``text``.

    ``base`` resolves relative paths; ``source`` names the list in error messages.
    """
    lines = _content_lines(text)
    if not lines:
        return []
    header_line = lines[0][1]
    delim = "\t" if "\t" in header_line else ","
    header = [h.strip().lower() for h in next(csv.reader([header_line], delimiter=delim))]
    if "path" not in header:
        if force_csv:
            raise UsageError(f"{source}: slide list has no 'path' column (header: {header_line.strip()!r})")
        return [_checked(_entry(base, ln.strip(), None, None), f"{source} line {lineno}") for lineno, ln in lines]
    rows = csv.reader(io.StringIO("\n".join(ln for _, ln in lines[1:])), delimiter=delim)
    out: list[SlideEntry] = []
    # not strict: a quoted field that spans lines makes fewer rows than lines (pairing kept as it always was)
    for (lineno, _), row in zip(lines[1:], rows, strict=False):
        rec = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        where = f"{source} line {lineno}"
        if not rec.get("path"):
            raise UsageError(f"{where}: empty 'path'")
        out.append(_checked(_entry(base, rec["path"], rec.get("slide_id") or None, _parse_mpp(rec.get("mpp"), where)), where))
    return out


def _entry(base: Path, raw: str, slide_id: str | None, mpp: float | None) -> SlideEntry:
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        path = base / path
    path = Path(os.path.normpath(path))
    if not path.exists():
        reason = "file not found" if not path.is_symlink() else f"file not found: {missing_reason(path)}"
        return SlideEntry(slide_id or slide_identity(path).slide_id, path, mpp, reason)
    ident = slide_identity(path)  # a DICOM series: its level-0 file and the series' id
    return SlideEntry(slide_id or ident.slide_id, ident.path, mpp, ident.error)


def _checked(entry: SlideEntry, where: str) -> SlideEntry:
    """``entry`` when its slide id can name output files; else UsageError naming ``where`` (a list row, a file)."""
    validate_slide_id(entry.slide_id, where)
    return entry


def _expand(spec: str, stdin: TextIO | None) -> list[SlideEntry]:
    if spec == "-":
        stream = stdin if stdin is not None else sys.stdin
        return parse_list(stream.read(), Path.cwd(), "stdin")
    path = Path(os.path.expanduser(spec))
    if path.is_dir() and not is_slide_file(path):
        found = scan_dir(path)
        if not found:
            log.warning("no slide files found in folder %s", spec)
        return [_entry(Path.cwd(), str(p), None, None) for p in found]
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read slide list {spec}: {exc}") from exc
        return parse_list(text, path.parent, spec, force_csv=path.suffix.lower() in (".csv", ".tsv"))
    if not path.exists() and _GLOB_CHARS & set(spec):
        return _expand_glob(spec)
    return [_entry(Path.cwd(), spec, None, None)]


def _expand_glob(spec: str) -> list[SlideEntry]:
    """The slides a glob pattern names: matching slide files, and matching folders searched
    (:mod:`mstar_extract.discover`)."""
    pattern = os.path.expanduser(spec)
    # hidden names are skipped only below the pattern's literal folder (a path like /data/.cache/*.svs is fine)
    literal = os.path.dirname(pattern[: min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)])
    if "**" in pattern:  # glob.glob would follow link loops under '**' forever
        found = glob_slides(literal, pattern[len(literal):])
    else:
        found = []
        for match in sorted(glob.glob(pattern)):
            m = Path(match)
            if _is_hidden(m, Path(literal)):
                continue
            if m.is_dir() and not is_slide_file(m):
                found.extend(scan_dir(m))
            elif is_slide_file(m):
                found.append(m)
    out = [_entry(Path.cwd(), str(p), None, None) for p in one_path_per_file(found)]
    if not out:
        log.warning("no slide files match %s", spec)
    return out


def check_specs_exist(specs: Sequence[str]) -> None:
    """Raise :class:`UsageError` naming every SLIDES argument that does not exist (a glob pattern and ``-`` are
    not paths; a broken symbolic link does not exist). Costs one ``stat`` per argument, before any search."""
    missing = [(spec, Path(os.path.expanduser(spec))) for spec in specs
               if spec != "-" and not (_GLOB_CHARS & set(spec)) and not os.path.exists(os.path.expanduser(spec))]
    if missing:
        what = "; ".join(f"'{spec}': {missing_reason(path)}" for spec, path in missing)
        raise UsageError(f"SLIDES argument{'s' if len(missing) > 1 else ''} not found: {what}")


def resolve_slides(specs: Sequence[str] | Iterable[str], stdin: TextIO | None = None,
                   missing_ok: bool = False) -> list[SlideEntry]:
    """Expand SLIDES specs (see module docstring) into entries sorted by slide id, then path.

    Raises :class:`UsageError` for a SLIDES argument that does not exist (unless ``missing_ok``: then it becomes
    an entry with ``error`` set, as a missing path inside a list always does), an unreadable or malformed list,
    duplicate slide ids, or when nothing at all was found.
    """
    specs = list(specs)
    if not specs:
        raise UsageError("no slides given (files, folders, glob patterns, a CSV/TXT list, or '-' for stdin)")
    if not missing_ok:
        check_specs_exist(specs)
    by_path: dict[tuple[object, ...], SlideEntry] = {}
    for spec in specs:
        for entry in _expand(spec, stdin):
            _checked(entry, str(entry.path))  # ids from file names (list rows were checked as they were read)
            key = file_key(entry.path)  # one file reached by two paths (a link) is one slide
            prev = by_path.get(key)
            if prev is None or (prev.mpp is None and entry.mpp is not None):
                by_path[key] = entry if prev is None else SlideEntry(prev.slide_id, prev.path, entry.mpp, prev.error)
    by_id: dict[str, SlideEntry] = {}
    for entry in by_path.values():
        other = by_id.get(entry.slide_id)
        if other is not None:
            raise UsageError(
                f"two slides have the id '{entry.slide_id}': {other.path} and {entry.path} "
                "(rename one, or give ids with a CSV list's slide_id column)"
            )
        by_id[entry.slide_id] = entry
    if not by_id:
        raise UsageError(f"no slides found in: {' '.join(specs)}")
    return sorted(by_id.values(), key=lambda e: (e.slide_id, str(e.path)))
