"""The slide layer on real files: metadata, resolution rules, backend agreement, broken inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from mstar_extract.errors import ReadError, ResolutionError, SlideOpenError, UsageError
from mstar_extract.slides import backend_order, open_slide, slide_stem
from mstar_extract.slides._pixels import rgba_to_rgb_on_white
from mstar_extract.slides.resolution import mpp_from_tiff_resolution, resolve

PYRAMIDS = ["svs40", "svs20", "tiff_nometa"]
EXPECTED = {"svs40": (0.25, 40.0, "metadata"), "svs20": (0.5, 20.0, "metadata"), "tiff_nometa": (None, None, None)}


@pytest.mark.parametrize("name", PYRAMIDS)
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_metadata(fixture_slides, name, backend):
    mpp, mag, source = EXPECTED[name]
    with open_slide(fixture_slides[name].path, backend=backend) as s:
        assert s.backend == backend
        assert s.mpp_x == mpp and s.mpp_y == mpp and s.mpp_source == source
        assert s.objective_magnification == mag
        if name.startswith("svs"):
            assert s.vendor == "aperio"
            assert set(s.associated_images) == {"label", "macro", "thumbnail"}
            label = s.read_associated_image("label")
            assert label.shape == (240, 320, 3) and label.dtype == np.uint8
        if mpp is None:
            with pytest.raises(ResolutionError, match="--mpp-override"):
                _ = s.mpp
        else:
            assert s.mpp == mpp and not s.mpp_estimated


@pytest.mark.parametrize("name", PYRAMIDS)
def test_backends_agree_on_levels_and_pixels(fixture_slides, name):
    path = fixture_slides[name].path
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        assert a.levels == b.levels
        w0, h0 = a.dimensions
        for level, lv in enumerate(a.levels):
            ds = lv.downsample
            boxes = [((0, 0), (256, 256)), ((w0 // 3, h0 // 3), (300, 200)),
                     (((w0 // 2) // int(ds) * int(ds), (h0 // 2) // int(ds) * int(ds)), (256, 256)),
                     ((w0 - int(100 * ds), h0 - int(50 * ds)), (256, 256)),  # crosses the bottom-right edge
                     ((-int(64 * ds), -int(32 * ds)), (128, 128))]  # crosses the top-left edge
            for loc, size in boxes:
                pa, pb = a.read_region(loc, level, size), b.read_region(loc, level, size)
                assert pa.shape == pb.shape == (size[1], size[0], 3) and pa.dtype == pb.dtype == np.uint8
                diff = np.abs(pa.astype(int) - pb.astype(int))
                assert diff.mean() < 1.5, (name, level, loc, diff.mean())
        # outside the slide: pure white from both
        for s in (a, b):
            assert (s.read_region((w0 - 100, h0 - 50), 0, (256, 256))[50:, :] == 255).all()
            assert (s.read_region((w0 - 100, 0), 0, (256, 64))[:, 100:] == 255).all()
            assert (s.read_region((-64, -32), 0, (128, 128))[:32] == 255).all()
            assert (s.read_region((w0 + 500, h0 + 500), 0, (64, 64)) == 255).all()


def test_auto_backend_and_thumbnail(fixture_slides):
    with open_slide(fixture_slides["svs40"].path) as s:
        assert s.backend in ("tiffslide", "openslide")
        thumb = s.get_thumbnail((300, 300))
        assert thumb.shape == (200, 300, 3)
        assert s.get_best_level_for_downsample(8) == 1 and s.get_best_level_for_downsample(100) == 2
    assert backend_order("a.svs") == ("tiffslide", "openslide")
    assert backend_order("a.tif") == ("tiffslide", "openslide", "image")
    assert backend_order("a.ndpi") == ("openslide", "tiffslide")
    assert backend_order("a.mrxs") == ("openslide",)
    assert backend_order("a.png") == ("image",)
    assert backend_order("a.svs", "openslide") == ("openslide",)
    with pytest.raises(UsageError):
        backend_order("a.svs", "bioformats")


def test_override_wins_over_metadata(fixture_slides):
    with open_slide(fixture_slides["svs40"].path, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "override" and s.objective_magnification == 40
    with open_slide(fixture_slides["tiff_nometa"].path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(UsageError):
            open_slide(fixture_slides["svs40"].path, mpp=bad)


def test_plain_image(fixture_slides):
    fx = fixture_slides["png_small"]
    ref = cv2.imread(str(fx.path))[:, :, ::-1]
    with open_slide(fx.path, mpp=fx.mpp) as s:
        assert s.backend == "image" and s.dimensions == (1200, 900) and s.mpp == 0.5
        assert np.array_equal(s.read_region((100, 50), 0, (64, 32)), ref[50:82, 100:164])
        edge = s.read_region((1150, 880), 0, (100, 100))
        assert np.array_equal(edge[:20, :50], ref[880:, 1150:]) and (edge[20:] == 255).all()
    with open_slide(fx.path) as s, pytest.raises(ResolutionError):
        _ = s.mpp


def _small_tiff(path: Path, **kw) -> Path:
    data = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, data, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None, **kw)
    return path


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiff_resolution_units(tmp_path, backend):
    cm = _small_tiff(tmp_path / "cm.tif", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    inch = _small_tiff(tmp_path / "inch.tif", resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    dpi72 = _small_tiff(tmp_path / "dpi72.tif", resolution=(72, 72), resolutionunit="INCH")
    with open_slide(cm, backend=backend) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "metadata"
    with open_slide(inch, backend=backend) as s:
        assert s.mpp == pytest.approx(0.25)
    with open_slide(dpi72, backend=backend) as s:
        assert s.mpp_x is None


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_objective_power_only_is_an_estimate(tmp_path, backend):
    path = tmp_path / "mag_only.svs"
    data = np.full((512, 768, 3), 220, np.uint8)
    tifffile.imwrite(path, data, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                     description="Aperio Image Library v12.0.15 \r\n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=80|AppMag = 20")
    with open_slide(path, backend=backend) as s:
        assert s.objective_magnification == 20 and s.mpp == pytest.approx(0.5)
        assert s.mpp_source == "objective" and s.mpp_estimated


def test_resolution_rules():
    assert mpp_from_tiff_resolution("20000", "20000", "centimeter") == pytest.approx((0.5, 0.5))
    assert mpp_from_tiff_resolution("101600/1", "101600/1", "inch") == pytest.approx((0.25, 0.25))
    assert mpp_from_tiff_resolution("1", "1", "none") is None
    assert mpp_from_tiff_resolution("72", "72", "inch") is None
    assert resolve({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2529"}).mpp_y == pytest.approx(0.2529)
    assert resolve({"aperio.MPP": "0.499", "aperio.AppMag": "20"}) .source == "metadata"
    r = resolve({"openslide.objective-power": "40"})
    assert (r.mpp_x, r.source, r.magnification) == (0.25, "objective", 40.0)
    assert resolve({}).mpp_x is None and resolve({}, override=0.7).source == "override"


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
@pytest.mark.parametrize("name,reason", [("broken_empty", "empty file"), ("broken_text", "not a"),
                                         ("broken_truncated", "truncated")])
def test_broken_files_fail_to_open_with_one_line(fixture_slides, backend, name, reason):
    with pytest.raises(SlideOpenError) as err:
        open_slide(fixture_slides[name].path, backend=backend)
    msg = str(err.value)
    assert reason in msg and str(fixture_slides[name].path) in msg and "\n" not in msg


def test_missing_unsupported_and_directory(tmp_path):
    with pytest.raises(SlideOpenError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(SlideOpenError, match="unsupported file extension '.docx'"):
        open_slide(tmp_path / "notes.docx")
    (tmp_path / "d.svs").mkdir()
    with pytest.raises(SlideOpenError, match="directory"):
        open_slide(tmp_path / "d.svs")


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupt_tile_raises_read_error_and_slide_stays_usable(fixture_slides, backend):
    fx = fixture_slides["broken_corrupt_tile"]
    x, y, w, h = fx.extra["corrupt_tile"]
    with open_slide(fx.path, backend=backend) as s:  # the structure is valid: it opens
        good = s.read_region((0, 0), 0, (128, 128))
        with pytest.raises(ReadError, match=rf"level-0 \({x + 10}, {y + 10}\)"):
            s.read_region((x + 10, y + 10), 0, (64, 64))
        assert np.array_equal(s.read_region((0, 0), 0, (128, 128)), good)  # later reads still work
        s.read_region((0, 0), 1, s.level_dimensions[1])  # the coarser level is intact


def test_rgba_composite_and_stem():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    out = rgba_to_rgb_on_white(rgba)
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]]
    assert slide_stem("/x/a.b.ome.tiff") == "a.b" and slide_stem("case.SVS") == "case" and slide_stem("x.h5") == "x.h5"


OME_HEAD = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
            '<Instrument ID="Instrument:0"><Objective ID="Objective:0" NominalMagnification="40.0"/></Instrument>'
            '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="10" SizeY="10" '
            'SizeC="3" SizeZ="1" SizeT="1" {attrs}/></Image></OME>')


@pytest.mark.parametrize("attrs,expected", [
    ('PhysicalSizeX="0.25" PhysicalSizeY="0.26"', (0.25, 0.26)),  # no unit: the OME default, µm
    ('PhysicalSizeX="0.5" PhysicalSizeXUnit="µm" PhysicalSizeY="0.5" PhysicalSizeYUnit="μm"', (0.5, 0.5)),  # micro / mu
    ('PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="250" PhysicalSizeYUnit="nm"', (0.25, 0.25)),
    ('PhysicalSizeX="0.00025" PhysicalSizeXUnit="mm" PhysicalSizeY="0.00025" PhysicalSizeYUnit="mm"', (0.25, 0.25)),
    ('PhysicalSizeX="2.5E-7" PhysicalSizeXUnit="m"', (0.25, 0.25)),  # only X: used for both
    ('PhysicalSizeX="1" PhysicalSizeXUnit="pixel" PhysicalSizeY="1" PhysicalSizeYUnit="pixel"', None),  # not physical
    ('PhysicalSizeX="1" PhysicalSizeXUnit="mm"', None),  # 1000 µm/px: outside the plausible range
    ("", None),
])
def test_ome_xml_resolution_units(attrs, expected):
    from mstar_extract.slides.resolution import mpp_from_ome_xml

    got = mpp_from_ome_xml(OME_HEAD.format(attrs=attrs))
    assert got == (pytest.approx(expected) if expected else None)
    res = resolve({"tiff.ImageDescription": OME_HEAD.format(attrs=attrs), "tiff.ResolutionUnit": "NONE"})
    assert res.magnification == 40.0  # Objective NominalMagnification
    assert res.source == ("metadata" if expected else "objective")
    assert resolve({"tiff.ImageDescription": "Aperio Image Library |MPP = 0.5"}).source is None  # not OME-XML


def test_ome_tiff_named_tif_is_found_by_its_content(fixture_slides, tmp_path):
    """An OME-TIFF without the .ome suffix: auto still picks tiffslide (OpenSlide would see one level), and the
    resolution comes from its OME-XML."""
    from mstar_extract.testing.fixtures import make_ome_tiff

    path = make_ome_tiff(fixture_slides["svs20"].path, tmp_path / "export.tif")
    assert backend_order(path) == ("tiffslide", "image")
    assert backend_order(fixture_slides["tiff_nometa"].path) == ("tiffslide", "openslide", "image")
    with open_slide(path) as s:
        assert s.backend == "tiffslide" and len(s.levels) == 2
        assert s.mpp_x == pytest.approx(0.5) and s.mpp_source == "metadata"


def test_dicom_objective_power_key():
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "dicom.OpticalPathSequence[0].ObjectiveLensPower": "40.0"}
    res = resolve(props)
    assert (res.mpp_x, res.source, res.magnification) == (0.25, "metadata", 40.0)
