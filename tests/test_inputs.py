"""SLIDES arguments: files, folders, globs, CSV/TXT lists, stdin, duplicate ids, missing paths."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from mstar_extract.errors import UsageError
from mstar_extract.inputs import resolve_slides


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ["a/s1.svs", "a/sub/s2.ndpi", "a/sub/s3.ome.tif", "a/s4.PNG", "b/s5.tiff", "a/notes.txt",
                "a/.hidden.svs", "a/.cache/s6.svs", "a/.s1.svs.host.1.abcd.tmp", "a/feat.h5"]:
        touch(tmp_path / rel)
    return tmp_path


def ids(entries):
    return [e.slide_id for e in entries]


def test_directory_recursive_skips_hidden_temp_and_non_slides(tree):
    entries = resolve_slides([str(tree / "a")])
    assert ids(entries) == ["s1", "s2", "s3", "s4"]
    assert all(e.error is None and e.mpp is None and e.path.is_absolute() for e in entries)


def test_files_globs_and_sorting(tree, monkeypatch):
    monkeypatch.chdir(tree)
    entries = resolve_slides(["b/s5.tiff", "a/*.svs", "a/**/*.ndpi"])
    assert ids(entries) == ["s1", "s2", "s5"]
    assert entries[0].path == tree / "a" / "s1.svs"
    assert ids(resolve_slides(["a/sub/*"])) == ["s2", "s3"]
    assert ids(resolve_slides(["*"])) == ["s1", "s2", "s3", "s4", "s5"]  # folders matched by a glob are searched


def test_same_file_twice_is_kept_once(tree):
    assert ids(resolve_slides([str(tree / "a"), str(tree / "a" / "s1.svs")])) == ["s1", "s2", "s3", "s4"]


def test_csv_list_with_ids_and_mpp_relative_to_list(tree):
    lst = tree / "lists" / "cohort.csv"
    lst.parent.mkdir()
    lst.write_text("path,slide_id,mpp,label\n../a/s1.svs,case-001,0.25,tumour\n# a comment\n\n"
                   f"{tree / 'b' / 's5.tiff'},,,normal\n../a/gone.svs,case-404,,x\n")
    entries = resolve_slides([str(lst)])
    assert ids(entries) == ["case-001", "case-404", "s5"]
    one, gone, five = entries
    assert one.path == tree / "a" / "s1.svs" and one.mpp == 0.25 and one.error is None
    assert five.mpp is None
    assert gone.error == "file not found" and gone.path == tree / "a" / "gone.svs"


def test_txt_list_of_paths_and_tsv(tree):
    lst = tree / "slides.txt"
    lst.write_text("# my slides\na/s1.svs\n\nb/s5.tiff\n")
    assert ids(resolve_slides([str(lst)])) == ["s1", "s5"]
    tsv = tree / "slides.tsv"
    tsv.write_text("slide_id\tpath\tmpp\nX\ta/s1.svs\t0.5\n")
    (entry,) = resolve_slides([str(tsv)])
    assert (entry.slide_id, entry.mpp) == ("X", 0.5)


def test_stdin_paths_and_csv(tree, monkeypatch):
    monkeypatch.chdir(tree)
    entries = resolve_slides(["-"], stdin=io.StringIO("a/s1.svs\n# skip\n\nb/s5.tiff\n"))
    assert ids(entries) == ["s1", "s5"] and entries[0].path == tree / "a" / "s1.svs"
    entries = resolve_slides(["-"], stdin=io.StringIO("path,mpp\na/s1.svs,0.5\n"))
    assert entries[0].mpp == 0.5


def test_duplicate_ids_name_both_paths(tree):
    touch(tree / "c" / "s1.tif")
    with pytest.raises(UsageError) as err:
        resolve_slides([str(tree / "a"), str(tree / "c")])
    msg = str(err.value)
    assert "'s1'" in msg and str(tree / "a" / "s1.svs") in msg and str(tree / "c" / "s1.tif") in msg


def test_missing_argument_is_a_usage_error_naming_it(tree):
    """A SLIDES argument that does not exist stops the run before any work (inside a list it is per-slide)."""
    with pytest.raises(UsageError) as err:
        resolve_slides([str(tree / "a" / "s1.svs"), str(tree / "nope.svs"), str(tree / "gone")])
    msg = str(err.value)
    assert "\n" not in msg and f"'{tree / 'nope.svs'}': no such file or folder" in msg and str(tree / "gone") in msg
    os.symlink(tree / "moved.svs", tree / "link.svs")
    with pytest.raises(UsageError, match="broken symbolic link to"):
        resolve_slides([str(tree / "link.svs")])
    entries = resolve_slides([str(tree / "a" / "s1.svs"), str(tree / "nope.svs")], missing_ok=True)  # mstar info
    assert [(e.slide_id, e.error) for e in entries] == [("nope", "file not found"), ("s1", None)]


@pytest.mark.parametrize("content,match", [("slide,mpp\nx.svs,1\n", "no 'path' column"),
                                            ("path,mpp\nx.svs,abc\n", "line 2: mpp 'abc' is not a number"),
                                            ("path,mpp\nx.svs,-1\n", "positive")])
def test_bad_lists_are_usage_errors(tmp_path, content, match):
    lst = tmp_path / "l.csv"
    lst.write_text(content)
    with pytest.raises(UsageError, match=match):
        resolve_slides([str(lst)])


def test_nothing_found_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no slides"):
        resolve_slides([str(tmp_path)])
    with pytest.raises(UsageError, match="no slides given"):
        resolve_slides([])


def test_glob_below_a_hidden_folder_still_matches(tmp_path):
    base = tmp_path / ".data" / "slides"
    touch(base / "s1.svs")
    touch(base / ".s2.svs")
    touch(base / ".cache" / "s3.svs")
    assert ids(resolve_slides([str(base / "*.svs")])) == ["s1"]
    assert ids(resolve_slides([str(base / "**" / "*.svs")])) == ["s1"]


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """A slides folder with a link loop (``x -> .``), a link to a slide beside it, a self-link and a broken link
    with slide names, and a link to a folder outside it. (Two loops made the old search run for ever: that case
    runs in a subprocess with a timeout, ``tests/test_discovery_cli.py``.)"""
    d = tmp_path / "d"
    touch(d / "s1.svs")
    touch(d / "sub" / "s2.svs")
    touch(tmp_path / "elsewhere" / "s3.svs")
    os.symlink(".", d / "x")
    os.symlink("s1.svs", d / "alias.svs")
    os.symlink("self.svs", d / "self.svs")
    os.symlink("moved-away.svs", d / "broken.svs")
    os.symlink(tmp_path / "elsewhere", d / "ext")
    return d


def test_link_loops_are_searched_once_and_broken_links_are_per_slide_failures(linked):
    entries = resolve_slides([str(linked)])
    assert [(e.slide_id, e.path.relative_to(linked).as_posix()) for e in entries] == [
        ("broken", "broken.svs"), ("s1", "s1.svs"), ("s2", "sub/s2.svs"), ("s3", "ext/s3.svs"), ("self", "self.svs")]
    errors = {e.slide_id: e.error for e in entries}
    assert errors["broken"] == "file not found: broken symbolic link to 'moved-away.svs'"
    assert errors["self"].startswith("file not found: broken symbolic link") and errors["s1"] is None


def test_recursive_globs_follow_links_once(linked):
    for pattern in ("**/*.svs", "**"):
        entries = resolve_slides([str(linked / pattern)])
        assert ids(entries) == ["broken", "s1", "s2", "s3", "self"], pattern
        assert {e.slide_id: e.path for e in entries}["s1"] == linked / "s1.svs"  # the link-free path, not x/x/s1.svs
    assert ids(resolve_slides([str(linked / "**" / "s?.svs")])) == ["s1", "s2", "s3"]


def test_a_link_to_a_slide_is_that_slide(tmp_path):
    touch(tmp_path / "scans" / "case7.svs")
    os.symlink(tmp_path / "scans" / "case7.svs", tmp_path / "scans" / "a_link.svs")
    os.symlink(tmp_path / "scans", tmp_path / "again")
    (entry,) = resolve_slides([str(tmp_path)])
    assert (entry.slide_id, entry.path) == ("case7", tmp_path / "scans" / "case7.svs")
