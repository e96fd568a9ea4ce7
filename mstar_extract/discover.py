"""Find the slide files under a folder or a recursive glob pattern, safely on any file system.

* Symbolic links are followed, but every real folder is searched once, identified by ``(st_dev, st_ino)``: a link
  loop (``ln -s . d/x``, ``ln -s .. d/sub/up``) ends instead of growing ``d/x/x/x/...`` paths, and a folder reached
  through several links is searched once. Folders reachable without following a link are searched first, so their
  link-free paths are the ones reported; folders reachable only through a link are searched through that link.
* One path per file: a link to a slide beside it (``alias.svs -> case7.svs``) and the slide are one slide, reported
  under the link-free path (whose name gives the slide id).
* A broken link with a slide name (or a link to itself) is kept: it becomes one slide that fails with
  "file not found: broken symbolic link to ..." while the other slides go on.
* Hidden names (``.*``) below the searched folder are skipped, and a MIRAX data folder (``X/`` beside ``X.mrxs``)
  is never entered; the files of one folder become slides with
  :func:`mstar_extract.slides.formats.group_slide_files` (one per DICOM series, no Hamamatsu VMS parts).

``glob.glob(..., recursive=True)`` follows links under ``**`` without such a guard (two loops: 2**40 paths), so
patterns holding ``**`` are matched here (:func:`glob_slides`) on the folders of one such walk.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mstar_extract.slides.formats import group_slide_files, is_mrxs_data_dir, is_slide_file


def file_key(path: str | os.PathLike) -> tuple[object, ...]:
    """What makes two paths the same file: ``(st_dev, st_ino)`` of the file, or, for a broken link, of the link
    itself (so one broken link reached by two paths is one entry); a path that does not exist is its own key."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        pass
    try:
        st = os.lstat(path)
        return "link", st.st_dev, st.st_ino
    except OSError:
        return "missing", os.path.abspath(path)


def is_link_free(path: str | os.PathLike) -> bool:
    """True when no component of ``path`` is a symbolic link."""
    return os.path.realpath(path) == os.path.abspath(path)


def missing_reason(path: str | os.PathLike[str]) -> str:
    """Why ``path`` (which does not exist) cannot be read: a broken symbolic link, naming its target, or absent."""
    if os.path.islink(path):
        try:
            return f"broken symbolic link to '{os.readlink(path)}'"
        except OSError:
            return "broken symbolic link"
    return "no such file or folder"


def walk(root: str | os.PathLike) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, visible file names, sorted)`` for every real folder under ``root``, each once (module doc)."""
    seen: set[tuple[object, ...]] = set()
    pending: list[Path] = [Path(root)]  # root, then the links to folders, in the order found
    while pending:
        top = pending.pop(0)
        for dirpath, dirnames, filenames in os.walk(top):  # links to folders are listed here, not followed
            key = file_key(dirpath)
            if key in seen:
                dirnames[:] = []
                continue
            seen.add(key)
            keep = []
            for d in sorted(dirnames):
                if d.startswith(".") or is_mrxs_data_dir(d, filenames):
                    continue
                if os.path.islink(os.path.join(dirpath, d)):
                    pending.append(Path(dirpath, d))
                else:
                    keep.append(d)
            dirnames[:] = keep
            yield Path(dirpath), sorted(n for n in filenames if not n.startswith("."))


def one_path_per_file(paths: Iterable[Path]) -> list[Path]:
    """One path per file (:func:`file_key`): the link-free one when there is one, else the first sorted. Sorted."""
    best: dict[tuple[object, ...], Path] = {}
    for p in sorted(paths):
        key = file_key(p)
        prev = best.get(key)
        if prev is None or (is_link_free(p) and not is_link_free(prev)):
            best[key] = p
    return sorted(best.values())


def scan_dir(root: str | os.PathLike) -> list[Path]:
    """The slides under ``root`` (recursive, module doc): one file per DICOM series, one path per file, sorted."""
    found: list[Path] = []
    for folder, names in walk(root):
        found.extend(group_slide_files(folder, [n for n in names if is_slide_file(n)]))
    return one_path_per_file(found)


def match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether the path ``parts`` match the glob ``pattern`` parts (``**``: zero or more folders; case-sensitive)."""
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(pattern):
                memo[i, j] = j == len(parts)
            elif pattern[i] == "**":
                memo[i, j] = any(match(i + 1, k) for k in range(j, len(parts) + 1))
            else:
                memo[i, j] = j < len(parts) and fnmatch.fnmatchcase(parts[j], pattern[i]) and match(i + 1, j + 1)
        return memo[i, j]

    return match(0, 0)


def glob_slides(root: str, rest: str) -> list[Path]:
    """The slides that the pattern ``root/rest`` names (``root``: its literal folder, '' for the current one;
    ``rest`` may hold ``**``): slide files that match, and every slide inside a folder that matches, found in one
    :func:`walk` of ``root`` (each real folder once). Sorted, one path per file."""
    pattern = [p for p in rest.split("/") if p not in ("", ".")]
    base = Path(root or ".")
    found: list[Path] = []
    for folder, names in walk(base):
        rel = folder.relative_to(base).parts
        inside = any(match_parts(pattern, rel[:i]) for i in range(1, len(rel) + 1))
        chosen = [n for n in names if is_slide_file(n) and (inside or match_parts(pattern, (*rel, n)))]
        found.extend(Path(root, *p.relative_to(base).parts) for p in group_slide_files(folder, chosen))
    return one_path_per_file(found)
