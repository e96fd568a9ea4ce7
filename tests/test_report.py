"""`mstar report` on real outputs (issue 15).

* a real ``mstar extract`` run (tiny timm ViT, seeded random weights) over fixture slides: two slides of different
  tissue texture, a slide without resolution metadata (``--mpp-override``), glass only (no tissue), a broken
  file, a missing file whose path carries ``</script>`` into the error text, and a slide whose id is an HTML
  injection attempt; the report is written by the run itself (the end-of-run hook);
* the report loaded in a real headless browser (Debian's ``chromium``): the rendered DOM holds every slide id
  and status, every link and image of every page resolves to a file, screenshots are not blank, nothing
  hostile became markup or ran;
* facts checked against independent truth: tissue area against the fixture's ground-truth mask, patch counts
  against the bags, feature-map pixels against the bag's patches; the two textures get different colours;
* incremental rebuilds, ``--rebuild``, ``--no-report``, ``mstar status``, ``--open``, and a 10,000-slide
  synthetic manifest (its build time is printed, not asserted).
"""

from __future__ import annotations

import csv
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from mstar_extract.manifest import ManifestRow, ManifestWriter, latest_rows, read_parts
from mstar_extract.report.build import build_report
from mstar_extract.report.layout import run_path
from mstar_extract.report.summary import slide_flags
from mstar_extract.store.bags import read_bag
from mstar_extract.testing.fixtures import load_truth, make_svs
from mstar_extract.testing.scene import Blob, Scene

TINY = "timm:test_vit"
FAST = ["--model", TINY, "--weights", "random", "--device", "cpu", "--workers", "0", "--batch-size", "16"]
HOSTILE_ID = "evil\"'><img src=x onerror=document.title='pwned'>&amp;"
HOSTILE_PATH = "/nowhere/</script><script>document.title='pwned'</script><i class=pwned>x</i>.svs"
HOSTILE_ERROR = "bad tile </script><script>document.title='pwned'</script><i class=pwned>x</i> & more"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def run_mstar(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """This checkout's ``mstar ARGS`` (:func:`mstar_extract.testing.cli.run_mstar`: forked from the test launcher)."""
    from mstar_extract.testing.cli import run_mstar as run_checkout

    return run_checkout(*args, env={**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600", **(env or {})}, timeout=timeout)


def manifest(out: Path) -> dict[str, dict[str, str]]:
    """The run's merged rows (every process's part file, as ``mstar status`` merges them)."""
    return {r.slide_id: r.to_csv_dict() for r in latest_rows(read_parts(out))}


def texture_scene(pale: bool) -> Scene:
    """One large island: pale (faint, low saturation) or darkly stained tissue, nothing else on the glass."""
    return Scene(1100.0, 900.0, (Blob(550, 450, 380, pale=pale, tint=1.0 if pale else 0.55),), seed=3)


@pytest.fixture(scope="module")
def run_out(fixture_slides, tmp_path_factory) -> Path:
    """OUT of one real ``mstar extract`` run (report written by the run's own end-of-run hook)."""
    root = tmp_path_factory.mktemp("report_run")
    slides = root / "slides"
    slides.mkdir()
    make_svs(slides / "pale.svs", texture_scene(pale=True), 0.5, 20, levels=(1, 4))
    make_svs(slides / "dark.svs", texture_scene(pale=False), 0.5, 20, levels=(1, 4))
    for name in ("svs20", "glass_only", "tiff_nometa", "broken_text"):
        shutil.copy(fixture_slides[name].path, slides / fixture_slides[name].path.name)
    shutil.copy(fixture_slides["svs20"].path, root / "hostile.svs")
    listing = root / "more.csv"
    with open(listing, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "slide_id"])
        w.writerow([str(root / "hostile.svs"), HOSTILE_ID])
        w.writerow([HOSTILE_PATH, "missing"])
    out = root / "out"
    r = run_mstar("extract", str(slides), str(listing), str(out), *FAST, "--mpp-override", "0.5")
    assert r.returncode == 1, r.stderr  # the broken and the missing slide failed
    assert "Traceback" not in r.stderr
    assert re.search(r"mstar: report: .*report\.html \(8 slides", r.stderr), r.stderr
    # one more failed slide, as another job would record it, whose error text is an injection attempt
    ManifestWriter(out).add(ManifestRow("hostile_error", "/data/x.svs", "failed", error=HOSTILE_ERROR))
    r = run_mstar("report", str(out))
    assert r.returncode == 0 and r.stdout.strip() == str(run_path(out, "report")), r.stderr
    assert "9 slides; rendered 1 pages, 0 thumbnails, 0 feature maps" in r.stderr  # incremental
    return out


# ------------------------------------------------------------------------------------------------ the browser
def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def dump_dom(profile: Path, url: str) -> str:
    r = chromium(profile, "--dump-dom", url)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


def screenshot(profile: Path, url: str, dest: Path, size: str = "1280,1000") -> np.ndarray:
    r = chromium(profile, f"--screenshot={dest}", f"--window-size={size}", url)
    assert r.returncode == 0 and dest.is_file(), r.stderr[-2000:]
    return np.asarray(Image.open(dest).convert("RGB"))


class Dom(html.parser.HTMLParser):
    """Every element (tag, attrs) and, per table row, its cells' text by cell class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.rows: list[dict[str, str]] = []
        self.cards: list[dict[str, str]] = []
        self.title = ""
        self._cell: str | None = None
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "tr" and "data-status" in a:
            self.rows.append({"_status": a["data-status"]})
        if tag == "a" and "tcard" in a.get("class", ""):
            self.cards.append({"_status": a["data-status"], "_href": a["href"]})
        if tag == "td" and self.rows:
            self._cell = a.get("class", "")
            self.rows[-1][self._cell] = ""
        if tag == "span" and a.get("class") == "sid" and self.cards:
            self._cell = "card-sid"
            self.cards[-1]["sid"] = ""
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "span"):
            self._cell = None
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cell == "card-sid":
            self.cards[-1]["sid"] += data
        elif self._cell is not None and self.rows:
            self.rows[-1][self._cell] += data

    def links(self) -> list[str]:
        tags = ("a", "img", "link", "script")
        return [a[k] for tag, a in self.elements for k in ("src", "href") if k in a and tag in tags]


def resolve_links(page: Path, links: list[str]) -> list[Path]:
    """Local files of a page's relative links; fails on any absolute (network) link."""
    files = []
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, f"{page}: non-local link {link!r}"
        if parts.path:
            files.append((page.parent / unquote(parts.path)).resolve())
    return files


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (Debian package chromium; "
                                              ".ci/run installs it with apt-get where it can)")
@pytest.mark.slow
def test_report_in_a_real_browser(run_out: Path, tmp_path: Path) -> None:
    rows = manifest(run_out)
    report = run_path(run_out, "report")
    profile = tmp_path / "profile"
    dom = Dom(dump_dom(profile, report.as_uri()))
    # every slide id and status is rendered by the page's script (one page: 9 slides < 100 per page)
    assert {r["c-id"]: r["_status"] for r in dom.rows} == {sid: r["status"] for sid, r in rows.items()}
    shown = {sid: r["status"].replace("_", " ") for sid, r in rows.items()}  # "no tissue"
    assert {r["c-id"]: r["c-status"] for r in dom.rows} == shown
    assert [r["c-err"] for r in dom.rows if r["c-id"] == "hostile_error"] == [HOSTILE_ERROR]  # shown as text
    # nothing hostile became markup or ran: no element from the id or the error text, the title untouched
    assert dom.title.startswith("mstar report")
    assert not [a for _, a in dom.elements if "onerror" in a or a.get("src") == "x" or a.get("class") == "pwned"]
    assert [t for t, _ in dom.elements].count("script") == 2
    # the contact sheet: one card per slide, thumbnails where a QC picture exists
    sheet = Dom(dump_dom(profile, report.as_uri() + "#view=sheet"))
    assert {c["sid"]: c["_status"] for c in sheet.cards} == {sid: r["status"] for sid, r in rows.items()}
    # every link and image of the report, the sheet and every slide page resolves to a file; the slide pages are
    # static HTML (no script): the browser renders the three with hostile text (each start costs ~4 CPU-seconds
    # here), the others are read as the files they are
    pages = sorted(run_path(run_out, "page", sid) for sid in rows)
    hostile = {run_path(run_out, "page", sid) for sid in (HOSTILE_ID, "hostile_error", "missing")}
    assert hostile <= set(pages)
    targets = resolve_links(report, dom.links()) + resolve_links(report, sheet.links())
    for page in pages:
        page_dom = Dom(dump_dom(profile, page.as_uri()) if page in hostile else page.read_text())
        assert page_dom.title != "pwned" and page_dom.title.endswith("· mstar report")
        assert not [a for _, a in page_dom.elements if "onerror" in a or a.get("class") == "pwned"]
        assert not [t for t, _ in page_dom.elements if t == "script"]
        targets += resolve_links(page, page_dom.links())
    missing = [str(t) for t in targets if not t.is_file()]
    assert not missing, missing
    kinds = {t.parent.name for t in targets}
    assert {"slides", "thumbs", "maps", "qc"} <= kinds and set(pages) <= set(targets)
    # screenshots are not blank: the index, and a slide page with its feature map over the slide picture
    for url, name in ((report.as_uri(), "index.png"), (run_path(run_out, "page", "dark").as_uri(), "dark.png")):
        img = screenshot(profile, url, tmp_path / name)
        assert img.shape[0] > 500 and img.std() > 8 and len(np.unique(img.reshape(-1, 3), axis=0)) > 200, name


# ------------------------------------------------------------------------------------------------ the facts
@pytest.mark.slow
def test_facts_match_the_outputs_and_the_truth(run_out: Path, fixture_slides) -> None:
    data = embedded_data(run_path(run_out, "report"))
    cols = data["columns"]
    table = {r[cols.index("id")]: dict(zip(cols, r, strict=True)) for r in data["rows"]}
    rows = manifest(run_out)
    assert set(table) == set(rows)
    for sid, r in rows.items():
        assert table[sid]["status"] == r["status"]
        if r["status"] == "done":
            assert table[sid]["n"] == int(r["n_patches"]) == len(read_bag(run_path(run_out, "bag", sid)))
    assert table["glass_only"]["status"] == "no_tissue" and "no_tissue" in table["glass_only"]["flags"]
    assert "failed" in table["missing"]["flags"] and "not found" in table["missing"]["err"]
    assert HOSTILE_PATH in table["missing"]["path"]
    assert table["svs20"]["mpp_src"] == "metadata" and table["tiff_nometa"]["mpp_src"] == "override"
    assert all("random_weights" in table[s]["flags"] for s in ("svs20", "pale", "dark", HOSTILE_ID))
    # tissue area against the fixture's ground truth (tissue under ink counts in the truth, not in the mask)
    truth = load_truth(fixture_slides["svs20"].truth_path)
    true_mm2 = float(truth["tissue"].sum()) * truth["mpp"] ** 2 / 1e6
    assert table["svs20"]["tissue_mm2"] == pytest.approx(true_mm2, rel=0.15)
    true_ink = float(truth["pen"].sum()) / float((truth["pen"] | truth["tissue"]).sum())
    # ink as segmented: the segmentation misses part of thin strokes (about a third of the fixture's pen pixels)
    assert 0.5 * true_ink <= table["svs20"]["ink"] <= 1.2 * true_ink, (table["svs20"]["ink"], true_ink)
    assert table["glass_only"]["tissue_mm2"] == 0 and table["pale"]["ink"] == 0


def embedded_data(report: Path) -> dict:
    text = report.read_text(encoding="utf-8")
    m = re.search(r'<script id="mstar-data" type="application/json">(.*?)</script>', text, re.S)
    assert m
    return json.loads(m.group(1))


def painted(grid_png: Path) -> tuple[np.ndarray, np.ndarray]:
    rgba = np.asarray(Image.open(grid_png).convert("RGBA"))
    on = rgba[..., 3] > 0
    return on, rgba[..., :3][on].astype(np.float64)


@pytest.mark.slow
def test_feature_maps_paint_every_patch_and_separate_textures(run_out: Path) -> None:
    for sid in ("pale", "dark", "svs20"):
        bag = read_bag(run_path(run_out, "bag", sid))
        on, _ = painted(run_path(run_out, "map", sid))
        step = bag.attrs["patch_size_level0"]  # no overlap: one grid cell per patch
        assert on.shape == (-(-bag.attrs["level0_height"] // step), -(-bag.attrs["level0_width"] // step))
        cells = {(int(y) // step, int(x) // step) for x, y in bag.coords}
        assert {(int(r), int(c)) for r, c in zip(*np.nonzero(on), strict=True)} == cells
    (_, pale), (_, dark) = painted(run_path(run_out, "map", "pale")), painted(run_path(run_out, "map", "dark"))
    assert len(pale) >= 10 and len(dark) >= 10
    gap = np.linalg.norm(pale.mean(0) - dark.mean(0))
    spread = max(np.linalg.norm(pale.std(0)), np.linalg.norm(dark.std(0)))
    print(f"\nfeature maps: pale vs dark mean colour distance {gap:.0f}, largest within-slide spread {spread:.0f}")
    assert gap > 60 and gap > spread, (gap, spread)  # the two textures get clearly different colours
    assert not run_path(run_out, "map", "glass_only").exists()  # no patches, no map


# ------------------------------------------------------------------------------------------------ escaping
@pytest.mark.slow
def test_hostile_id_and_error_text_are_escaped(run_out: Path) -> None:
    text = run_path(run_out, "report").read_text(encoding="utf-8")
    assert text.count("<script") == 2 and "</script><script>" not in text and "<img" not in text
    data = embedded_data(run_path(run_out, "report"))
    ids = [r[0] for r in data["rows"]]
    assert HOSTILE_ID in ids  # exactly the id, restored by JSON
    page = run_path(run_out, "page", HOSTILE_ID).read_text(encoding="utf-8")
    assert "<img src=x" not in page and not [a for _, a in Dom(page).elements if "onerror" in a]
    assert "<h1>evil&quot;&#x27;&gt;&lt;img src=x onerror=document.title=&#x27;pwned&#x27;&gt;&amp;amp;</h1>" in page
    for sid in ("missing", "hostile_error"):  # the hostile path and the hostile error text
        err = run_path(run_out, "page", sid).read_text(encoding="utf-8")
        elements = Dom(err).elements
        assert "&lt;/script&gt;&lt;script&gt;" in err and "<script" not in err
        assert not [t for t, a in elements if t == "script" or a.get("class") == "pwned"]


# ------------------------------------------------------------------------------------------------ incremental
@pytest.mark.slow
def test_rebuild_renders_only_what_changed(run_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run_out, out)
    first = build_report(out, rebuild=True)
    assert first.rendered["pages"] == 9 and first.rendered["maps"] == 5 and first.rendered["thumbs"] == 6
    again = build_report(out)
    assert again.rendered == {"pages": 0, "thumbs": 0, "maps": 0}
    # a new bag of one slide (same content, new file): its map is painted again; its page shows the same
    # facts and stays; nothing else is touched
    bag = run_path(out, "bag", "dark")
    data = bag.read_bytes()
    bag.unlink()
    bag.write_bytes(data)
    os.utime(bag, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert build_report(out).rendered == {"pages": 0, "thumbs": 0, "maps": 1}
    # a slide page deleted by hand comes back; a slide gone from the manifest loses its assets
    run_path(out, "page", "pale").unlink()
    assert build_report(out).rendered == {"pages": 1, "thumbs": 0, "maps": 0}
    rows = [r for sid, r in manifest(out).items() if sid != "pale"]
    shutil.rmtree(out / ".manifest")
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ManifestRow.columns())
        w.writeheader()
        w.writerows(rows)
    assert build_report(out).n_slides == 8
    assert not run_path(out, "page", "pale").exists() and not run_path(out, "map", "pale").exists()
    # a damaged QC picture is a note on that slide's page, not a failed report
    run_path(out, "qc", "dark").write_bytes(b"\xff\xd8 not a jpeg")
    result = build_report(out)
    assert result.rendered == {"pages": 1, "thumbs": 0, "maps": 0}
    assert "QC picture unreadable" in run_path(out, "page", "dark").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.slow
def test_tile_hook_no_report_status_and_open(fixture_slides, tmp_path: Path) -> None:
    slide = str(fixture_slides["svs20"].path)
    quiet = tmp_path / "quiet"
    r = run_mstar("tile", slide, str(quiet), "--no-report")
    assert r.returncode == 0, r.stderr
    assert not run_path(quiet, "report").exists() and not run_path(quiet, "assets").exists()
    st = run_mstar("status", str(quiet))
    assert "report: " in st.stdout and "not written yet" in st.stdout
    # --open hands the file URL to the browser named by $BROWSER (here a script that records it)
    seen = tmp_path / "browser.txt"
    fake = tmp_path / "browser.sh"
    fake.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    fake.chmod(0o755)
    r = run_mstar("report", str(quiet), "--open", env={"BROWSER": f"{fake} %s"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(run_path(quiet, "report"))
    deadline = time.time() + 20
    while not seen.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert seen.read_text().strip() == run_path(quiet, "report").resolve().as_uri()
    st = run_mstar("status", str(quiet))
    assert f"report: {run_path(quiet, 'report')}" in st.stdout and "not written yet" not in st.stdout
    # tile writes the report by default: thumbnails, no feature maps (no bags)
    loud = tmp_path / "loud"
    r = run_mstar("tile", slide, str(loud))
    assert r.returncode == 0 and "report: " in r.stderr, r.stderr
    data = embedded_data(run_path(loud, "report"))
    assert [row[0] for row in data["rows"]] == ["svs20"] and run_path(loud, "thumb", "svs20").is_file()
    assert not run_path(loud, "map", "svs20").exists()
    assert run_mstar("report", str(tmp_path / "nothing")).returncode == 2  # no such folder: usage error


def test_flags_relative_to_the_run() -> None:
    base = {"status": "done", "n": 1000, "ink": 0.01, "mpp_src": "metadata", "weights": "ab" * 32}
    assert slide_flags(base, 1000.0) == []
    assert slide_flags({**base, "n": 200}, 1000.0) == ["few_patches"]
    assert slide_flags({**base, "n": 200}, None) == []  # no median (too few slides)
    assert slide_flags({**base, "ink": 0.2, "mpp_src": "objective", "weights": "random"}, 1000.0) == [
        "much_ink", "mpp_objective", "random_weights"]
    assert slide_flags({**base, "status": "failed", "n": None}, 1000.0) == ["failed"]


# ------------------------------------------------------------------------------------------------ scale
def synthetic_run(out: Path, n: int = 10_000) -> None:
    """A manifest of ``n`` slides (no other files): statuses, patch counts, times, hostile error texts."""
    rng = random.Random(0)
    t = 1.7e9
    out.mkdir(parents=True)
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ManifestRow.columns())
        w.writeheader()
        for i in range(n):
            status = rng.choices(["done", "skipped", "no_tissue", "failed"], [90, 4, 3, 3])[0]
            sec = rng.uniform(5, 60)
            t += sec / 4
            n_patches = int(rng.lognormvariate(8, 0.7)) if status in ("done", "skipped") else None
            err = f"slide {i}: </script><script>alert({i})</script>" if status == "failed" else ""
            w.writerow(ManifestRow(f"S{i:05d}", f"/data/S{i:05d}.svs", status, n_patches, 0.25, sec, err,
                                   finished=t).to_csv_dict())


@pytest.mark.slow
def test_ten_thousand_slides(tmp_path: Path) -> None:
    out = tmp_path / "big"
    synthetic_run(out)
    t0 = time.perf_counter()
    first = build_report(out)
    t1 = time.perf_counter()
    again = build_report(out)
    t2 = time.perf_counter()
    size = run_path(out, "report").stat().st_size
    print(f"\n10,000-slide report: first build {t1 - t0:.1f} s ({first.rendered['pages']} pages), "
          f"rebuild {t2 - t1:.1f} s, report.html {size / 1e6:.1f} MB")
    assert first.n_slides == 10_000 and first.rendered["pages"] == 10_000 and again.rendered["pages"] == 0
    assert len(list(run_path(out, "page", "S00000").parent.iterdir())) == 10_000
    data = embedded_data(run_path(out, "report"))
    assert len(data["rows"]) == 10_000 and run_path(out, "report").read_text().count("</script>") == 2
    if CHROMIUM is not None:  # the page draws one page of 100 rows, whatever the run's size
        dom_text = dump_dom(tmp_path / "profile", run_path(out, "report").as_uri() + "#sort=n&dir=-1")
        dom = Dom(dom_text)
        assert len(dom.rows) == 100 and re.search(r'<span id="count">10,000 slides', dom_text)
        ns = [int(r["c-n"].replace(",", "")) for r in dom.rows]
        assert ns == sorted(ns, reverse=True)
        ms = re.search(r'data-render-ms="([0-9.]+)"', dom_text)
        print(f"10,000-slide report: drawn in {ms.group(1) if ms else '?'} ms in chromium")
