"""DICOM WSI series and OME-TIFF slides made by real writers from our SVS fixtures (issue 17).

DICOM: wsidicomizer converts the SVS (JPEG tiles copied byte for byte; or transcoded to lossless JPEG 2000).
OME-TIFF: tifffile writes the SVS's JPEG tiles as a pyramid in SubIFDs with OME-XML ``PhysicalSizeX/Y``.
Checked: one slide per series with the documented id, associated images, mpp, levels, the frame reader equal to
OpenSlide's ``read_region`` (max abs diff 0), the same patch coordinates and the same model inputs as the SVS the
file was made from, and ``mstar info``/``tile``/``extract`` on them with no extra option.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mstar_extract.cli import main as cli_main
from mstar_extract.errors import SlideOpenError
from mstar_extract.inputs import resolve_slides
from mstar_extract.pipeline.tile_job import TileSettings, segment_and_plan
from mstar_extract.reading import PatchReader, read_patches_naive
from mstar_extract.reading.dicom_tiles import DicomFrameSource
from mstar_extract.reading.format_sources import open_format_source
from mstar_extract.slides import backend_order, open_slide
from mstar_extract.slides.dicom import scan_folder
from mstar_extract.testing.fixtures import make_dicom, make_ome_tiff
from mstar_extract.tiling import TilingParams


@pytest.fixture(scope="session")
def formats(fixture_slides, tmp_path_factory) -> dict[str, Path]:
    """The converted slides (a few seconds, once per session). Layout under one root:

    ``case_svs40/`` DICOM (JPEG tiles copied) of svs40; ``svs40.ome.tif`` OME-TIFF (µm) of svs40;
    ``multi/`` two DICOM series of svs20 in one folder (container ``SLIDE-A`` with objective 20x; and one
    with the converter's defaults and no label/overview); ``cli/`` svs20.svs, ``svs20_j2k/`` (DICOM, lossless
    JPEG 2000) and ``svs20_ome.ome.tif`` (OME-TIFF, PhysicalSize in nm)."""
    root = tmp_path_factory.mktemp("formats")
    svs40, svs20 = fixture_slides["svs40"].path, fixture_slides["svs20"].path
    out = {"root": root, "svs40": svs40, "svs20": svs20}
    out["dicom40_files"] = make_dicom(svs40, root / "case_svs40")  # type: ignore[assignment]
    out["dicom40"] = root / "case_svs40"
    out["ome40"] = make_ome_tiff(svs40, root / "svs40.ome.tif")
    make_dicom(svs20, root / "multi", container_id="SLIDE-A", objective_power=20)
    make_dicom(svs20, root / "multi", associated=False)
    out["multi"] = root / "multi"
    cli = root / "cli"
    cli.mkdir()
    shutil.copy(svs20, cli / "svs20.svs")
    make_dicom(svs20, cli / "svs20_j2k", jpeg2000=True)
    out["j2k20"] = cli / "svs20_j2k"
    out["ome20"] = make_ome_tiff(svs20, cli / "svs20_ome.ome.tif", unit="nm")
    out["cli"] = cli
    return out


def _ids(entries) -> dict[str, Path]:
    return {e.slide_id: e.path for e in entries}


# --------------------------------------------------------------------------------------------- discovery
def test_dicom_series_is_one_slide_named_after_its_folder(formats):
    folder, files = formats["dicom40"], formats["dicom40_files"]
    assert len(files) == 6  # 3 levels + label + overview + thumbnail: what the converter writes
    (entry,) = resolve_slides([str(folder)])
    assert entry.slide_id == "case_svs40" and entry.error is None
    level0 = max(scan_folder(folder).series[0].volumes, key=lambda v: v.width)
    assert entry.path == level0.path and level0.width == 6000
    # every way of naming the series gives that one slide: all its files, any one file (a label), a glob
    assert _ids(resolve_slides([str(f) for f in files])) == {"case_svs40": level0.path}
    label = next(f for f in files if _flavor(folder, f) == "LABEL")
    assert _ids(resolve_slides([str(label)])) == {"case_svs40": level0.path}
    assert _ids(resolve_slides([str(folder / "*.dcm")])) == {"case_svs40": level0.path}


def _flavor(folder: Path, path: Path) -> str:
    return next(i.flavor for i in scan_folder(folder).series[0].instances if i.path == path)


def test_folder_tree_one_slide_per_series_ids_as_documented(formats):
    got = _ids(resolve_slides([str(formats["root"])]))
    series = {s.container_id: s for s in scan_folder(formats["multi"]).series}
    other = series["Unknown"].uid  # no usable container id (the converter's placeholder): the series UID
    assert set(got) == {"case_svs40", "svs40", "SLIDE-A", other, "svs20", "svs20_j2k", "svs20_ome"}
    assert got["SLIDE-A"] == series["SLIDE-A"].path and got[other] == series["Unknown"].path
    assert got["svs40"] == formats["ome40"]


def test_list_slide_id_overrides_and_folder_rows(formats, tmp_path):
    files = formats["dicom40_files"]
    lst = tmp_path / "slides.csv"
    with open(lst, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "slide_id"])
        w.writerow([str(files[-1]), "patient7_slide1"])  # any file of the series, renamed
        w.writerow([str(formats["j2k20"]), ""])  # a folder holding one series: the folder's name
        w.writerow([str(formats["multi"]), "ambiguous"])  # a folder holding two series: a per-slide error
    got = {e.slide_id: e for e in resolve_slides([str(lst)])}
    assert set(got) == {"patient7_slide1", "svs20_j2k", "ambiguous"}
    assert got["patient7_slide1"].path == resolve_slides([str(formats["dicom40"])])[0].path
    assert got["patient7_slide1"].error is None and got["svs20_j2k"].error is None
    assert "holds 2 DICOM WSI series" in got["ambiguous"].error
    with pytest.raises(SlideOpenError, match="holds 2 DICOM WSI series"):
        open_slide(formats["multi"])


def test_mrxs_data_folder_is_not_searched(tmp_path):
    (tmp_path / "X").mkdir()
    (tmp_path / "X.mrxs").write_text("[GENERAL]\n")
    (tmp_path / "X" / "Slidedat.ini").write_text("[GENERAL]\n")
    (tmp_path / "X" / "Data0000.dat").write_bytes(b"\0" * 16)
    (tmp_path / "X" / "preview.jpg").write_bytes(b"\xff\xd8")  # a slide-named file inside the data folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.jpg").write_bytes(b"\xff\xd8")  # an ordinary folder is searched
    assert sorted(e.slide_id for e in resolve_slides([str(tmp_path)])) == ["X", "b"]


def test_vms_jpeg_parts_are_not_slides(tmp_path):
    """A Hamamatsu VMS slide: the index file is the slide, the JPEG files it lists are its parts."""
    (tmp_path / "scan.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=scan.jpg\n"
                                       "ImageFile(1,0)=scan_1.jpg\nMapFile=scan_map.jpg\n")
    for name in ("scan.jpg", "scan_1.jpg", "scan_map.jpg", "photo.jpg"):
        (tmp_path / name).write_bytes(b"\xff\xd8")
    assert sorted(e.slide_id for e in resolve_slides([str(tmp_path)])) == ["photo", "scan"]


# --------------------------------------------------------------------------------------------- metadata
def test_dicom_metadata_levels_mpp_associated(formats):
    with open_slide(formats["svs40"], backend="openslide") as svs, open_slide(formats["dicom40"]) as d:
        assert (d.backend, d.vendor) == ("openslide", "dicom")
        assert d.levels == svs.levels
        assert (d.mpp_x, d.mpp_y, d.mpp_source) == (0.25, 0.25, "metadata")  # from PixelSpacing 0.00025 mm
        assert d.objective_magnification is None  # the converter writes no objective power
        assert set(d.associated_images) == {"label", "macro", "thumbnail"}
        assert d.read_associated_image("label").shape == (240, 320, 3)
    multi = {s.container_id: s for s in scan_folder(formats["multi"]).series}
    with open_slide(multi["SLIDE-A"].path) as a, open_slide(multi["Unknown"].path) as b:
        assert a.objective_magnification == 20 and a.mpp_x == 0.5  # ObjectiveLensPower, PixelSpacing
        assert set(a.associated_images) == {"label", "macro", "thumbnail"} and b.associated_images == ("thumbnail",)
        assert a.properties["dicom.SeriesInstanceUID"] != b.properties["dicom.SeriesInstanceUID"]


@pytest.mark.parametrize("key,unit", [("ome40", "µm"), ("ome20", "nm")])
def test_ome_tiff_resolution_and_subifd_levels(formats, key, unit):
    path = formats[key]
    svs = formats["svs40" if key == "ome40" else "svs20"]
    assert backend_order(path) == ("tiffslide", "image")  # OpenSlide would see only the first level
    with open_slide(svs, backend="openslide") as ref, open_slide(path) as s:
        assert s.backend == "tiffslide" and s.levels == ref.levels and len(s.levels) >= 2
        assert s.mpp_source == "metadata" and s.mpp_x == pytest.approx(ref.mpp_x) == pytest.approx(s.mpp_y)
        assert unit in s.properties["tiff.ImageDescription"]
    with open_slide(path, backend="openslide") as o:  # why not OpenSlide: the SubIFD levels are invisible to it
        assert len(o.levels) == 1 and o.mpp_x == pytest.approx(ref.mpp_x)  # the OME-XML is read there too


def test_dicom_frames_are_the_svs_tiles(formats):
    """What the converter does: level-0 frames are the SVS's JPEG tiles, byte for byte (even-length padding)."""
    import pydicom
    import tifffile
    from pydicom.encaps import generate_frames

    series = scan_folder(formats["dicom40"]).series[0]
    ds = pydicom.dcmread(series.path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    with tifffile.TiffFile(formats["svs40"]) as tf:
        page, fh = tf.pages[0], tf.filehandle
        assert len(frames) == len(page.dataoffsets)
        for k in (0, len(frames) // 2, len(frames) - 1):
            fh.seek(page.dataoffsets[k])
            tile = fh.read(page.databytecounts[k])
            assert frames[k][: len(tile)] == tile and len(frames[k]) - len(tile) in (0, 1)


# --------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("key", ["dicom40", "j2k20"])
def test_frame_reader_equals_openslide_read_region(formats, key):
    """The exactness rule: every level's region reads from the frames equal OpenSlide's read_region on the same
    DICOM files, max abs diff 0 (random boxes, across tile borders and the level's edges)."""
    import openslide

    rng = np.random.default_rng(17)
    with open_slide(formats[key]) as s, openslide.OpenSlide(str(s.path)) as osr:
        for level, lv in enumerate(s.levels):
            src = open_format_source(s, level)
            assert isinstance(src, DicomFrameSource), (key, level)
            try:
                for _ in range(20):
                    w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
                    x, y = int(rng.integers(-200, lv.width)), int(rng.integers(-200, lv.height))
                    ds = lv.downsample
                    mine = src.read(x, y, w, h)
                    # the official pipeline's pixels: OpenSlide, then convert('RGB') (outside the level: black)
                    ref = np.asarray(osr.read_region((round(x * ds), round(y * ds)), level, (w, h)).convert("RGB"))
                    assert int(np.abs(mine.astype(np.int16) - ref).max()) == 0, (key, level, x, y, w, h)
            finally:
                src.close()


def test_frame_reader_refuses_what_it_cannot_match(formats):
    """The open-time check can fail: a slide whose backend is not OpenSlide-on-DICOM gets no frame source, and
    a frame source whose frames disagree with the backend's pixels is refused."""
    with open_slide(formats["svs40"]) as svs:
        assert DicomFrameSource.open(svs, 0) is None
    with open_slide(formats["dicom40"]) as d:
        src = DicomFrameSource.open(d, 1)
        assert src is not None

        class Shifted:  # the same slide read one pixel off: the check must see the difference
            levels, backend, vendor, path = d.levels, "openslide", "dicom", d.path

            def read_region(self, loc, level, size):
                return d.read_region((loc[0] + 4, loc[1]), level, size)

        assert not src.matches_backend(Shifted(), 1)
        src.close()


CASES = [("dicom40", "svs40", 1.0), ("ome40", "svs40", 1.0), ("j2k20", "svs20", None), ("ome20", "svs20", None)]


@pytest.mark.parametrize("key,svs_key,mpp", CASES)
def test_same_coordinates_and_model_inputs_as_the_svs(formats, key, svs_key, mpp):
    """Tiling gives the SVS's coordinates; the fast reader reads them from the file's own tiles/frames and gives
    exactly the model inputs of OpenSlide read_region on the SVS + the reader's resize (10x from 40x = a reduced
    level (SubIFD / DICOM level 1); 20x from 20x = level 0)."""
    settings = TileSettings(tiling=TilingParams(mpp=mpp, patch_size=64) if mpp else TilingParams(patch_size=128))
    with open_slide(formats[svs_key]) as svs, open_slide(formats[key]) as other:
        _, plan_svs = segment_and_plan(svs, "svs", settings)
        _, plan = segment_and_plan(other, key, settings)
    assert len(plan) > 10 and plan.level == plan_svs.level == (1 if mpp else 0)
    np.testing.assert_array_equal(plan.coords, plan_svs.coords)
    assert plan.read_size == plan_svs.read_size
    ref = read_patches_naive(plan_svs, formats[svs_key], backend="openslide")
    with PatchReader(plan, formats[key], batch_size=16) as r:
        assert r.method == "tiles" and r.decode_scale == 1
        got = np.empty_like(ref)
        for batch in r:
            got[batch.indices] = batch.pixels
    assert int(np.abs(got.astype(np.int16) - ref).max()) == 0


# --------------------------------------------------------------------------------------------- commands
def _cli(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def test_info_shows_the_series_once(formats):
    r = _cli("info", str(formats["dicom40"]), str(formats["ome40"]), "--json")
    assert r.exit_code == 0, r.output
    recs = {rec["slide_id"]: rec for rec in json.loads(r.stdout)}
    assert set(recs) == {"case_svs40", "svs40"}
    d, o = recs["case_svs40"], recs["svs40"]
    assert (d["backend"], d["vendor"], d["mpp_x"], d["mpp_source"]) == ("openslide", "dicom", 0.25, "metadata")
    assert [lv["width"] for lv in d["levels"]] == [6000, 1500, 375]
    assert set(d["associated_images"]) == {"label", "macro", "thumbnail"}
    assert (o["backend"], o["mpp_source"], len(o["levels"])) == ("tiffslide", "metadata", 3)
    assert o["mpp_x"] == pytest.approx(0.25)
    human = _cli("info", str(formats["dicom40"])).output
    assert [ln.split()[0] for ln in human.splitlines() if ln and not ln.startswith(" ")] == ["case_svs40"]
    assert "vendor dicom" in human and "0.25 x 0.25 µm/px" in human and "levels:        3" in human


def test_broken_dcm_beside_a_series_fails_alone(formats, tmp_path):
    """A .dcm that is not DICOM (or not a slide) in a series' folder: one clear line for it, the series is
    still one slide named after the folder, exit code 1."""
    case = tmp_path / "case9"
    shutil.copytree(formats["dicom40"], case)
    (case / "notes.dcm").write_text("not a DICOM file\n")
    r = CliRunner().invoke(cli_main, ["info", str(case), "--json"])
    assert r.exit_code == 1
    recs = {rec["slide_id"]: rec for rec in json.loads(r.stdout)}
    assert set(recs) == {"case9", "notes"}
    assert recs["case9"]["error"] is None and recs["case9"]["vendor"] == "dicom"
    assert "notes.dcm" in r.stderr and "OpenSlide" in recs["notes"]["error"]
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


@pytest.mark.slow
def test_tile_and_extract_give_the_svs_results(formats, tmp_path):
    """`mstar tile` and `mstar extract` on a folder with an SVS, its DICOM (JPEG 2000) and its OME-TIFF, no extra
    option: three slides, the same coordinates and the same features."""
    import h5py

    out = tmp_path / "out"
    r = _cli("extract", str(formats["cli"]), str(out), "--model", "timm:test_vit", "--weights", "random",
             "--device", "cpu", "--workers", "1", "--batch-size", "8", "--no-qc")
    assert r.exit_code == 0, r.output
    with open(out / "manifest.csv", newline="") as fh:
        rows = {row["slide_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"svs20", "svs20_j2k", "svs20_ome"}
    assert {row["status"] for row in rows.values()} == {"done"}
    bags = {}
    for sid in rows:
        with h5py.File(out / "features" / f"{sid}.h5") as f:
            bags[sid] = (f["coords"][:], f["features"][:])
    for sid in ("svs20_j2k", "svs20_ome"):
        np.testing.assert_array_equal(bags[sid][0], bags["svs20"][0])
        np.testing.assert_array_equal(bags[sid][1], bags["svs20"][1])
