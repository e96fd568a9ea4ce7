"""The fixture builder writes real pyramidal slides whose pixels agree with their ground truth."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tiffslide

from mstar_extract.testing.fixtures import TRUTH_MPP, load_truth, make_large_svs
from mstar_extract.testing.scene import GLASS_RGB, random_scene, render_region

REPO = Path(__file__).resolve().parent.parent


def test_set_has_every_kind(fixture_slides):
    kinds = {name: fx.kind for name, fx in fixture_slides.items()}
    assert {"svs40", "svs20", "tiff_nometa", "png_small", "glass_only"} <= set(kinds)
    assert sorted(n for n, k in kinds.items() if k == "broken") == [
        "broken_corrupt_tile", "broken_empty", "broken_text", "broken_truncated"]
    for fx in fixture_slides.values():
        assert fx.path.exists()
    assert fixture_slides["broken_empty"].path.stat().st_size == 0


def test_truth_masks_are_consistent(fixture_slides):
    truth = load_truth(fixture_slides["svs40"].truth_path)
    assert truth["mpp"] == TRUTH_MPP and truth["slide_mpp"] == 0.25
    tissue, faint, holes, pen, pog = (truth[k] for k in ("tissue", "faint", "holes", "pen", "pen_on_glass"))
    assert tissue.dtype == bool and tissue.shape == (250, 375)  # 1.5 x 1.0 mm at 4 µm/px
    assert 0.05 < tissue.mean() < 0.5
    assert faint.any() and not (faint & ~tissue).any()
    assert holes.any() and not (holes & tissue).any()
    assert pog.any() and not (pog & ~pen).any() and (pen & tissue).any()  # ink on glass and across tissue
    assert truth["border"].any()


def test_glass_only_has_no_tissue_but_ink(fixture_slides):
    truth = load_truth(fixture_slides["glass_only"].truth_path)
    assert not truth["tissue"].any() and truth["pen_on_glass"].any()


def test_pixels_follow_the_truth(fixture_slides):
    fx = fixture_slides["svs40"]
    truth = load_truth(fx.truth_path)
    with tiffslide.TiffSlide(fx.path) as s:
        low = s.read_region((0, 0), 2, s.level_dimensions[2], as_array=True)[..., :3]  # 4 µm/px = truth grid
    assert low.shape[:2] == truth["tissue"].shape
    sat = cv2.cvtColor(np.ascontiguousarray(low), cv2.COLOR_RGB2HSV)[..., 1].astype(float)
    glass = ~(truth["tissue"] | truth["holes"] | truth["pen"] | truth["border"] | truth["dust"])
    glass = cv2.erode(glass.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    strong = truth["tissue"] & ~truth["faint"] & ~truth["pen"]
    assert np.abs(low[glass].mean(axis=0) - np.array(GLASS_RGB)).max() < 6
    assert sat[strong].mean() > 60 > sat[glass].mean() + 40
    faint = cv2.erode(truth["faint"].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~truth["pen"]
    assert sat[glass].mean() + 5 < sat[faint].mean() < sat[strong].mean()  # pale, but not glass
    green = low[truth["pen_on_glass"] & (np.arange(low.shape[0])[:, None] > 0.8 * low.shape[0])]
    assert green[:, 1].mean() > green[:, 0].mean() + 30  # the green line near the bottom


def test_20x_and_40x_show_the_same_scene(fixture_slides):
    with openslide.OpenSlide(fixture_slides["svs40"].path) as s40, openslide.OpenSlide(fixture_slides["svs20"].path) as s20:
        a = np.asarray(s40.read_region((0, 0), 1, s40.level_dimensions[1]))[..., :3]  # 1 µm/px
        b = np.asarray(s20.read_region((0, 0), 0, s20.level_dimensions[0]))[..., :3]  # 0.5 µm/px
    b = cv2.resize(b, a.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6


def test_png_and_tiff_without_resolution(fixture_slides):
    img = cv2.imread(str(fixture_slides["png_small"].path))
    assert img.shape == (900, 1200, 3)
    with openslide.OpenSlide(fixture_slides["tiff_nometa"].path) as s:
        assert "openslide.mpp-x" not in s.properties and s.properties.get("tiff.ResolutionUnit") == "none"
        assert s.level_count == 4


def test_large_svs_streams_with_bounded_memory(tmp_path):
    w, h = 4096, 8192  # peak memory must follow one strip of tiles, not the image height
    render_region(random_scene(100.0, 100.0, seed=3), 0.25)  # warm texture/noise caches (seed 3 = make_large_svs)
    tracemalloc.start()
    path = make_large_svs(tmp_path / "large.svs", width=w, height=h)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.3 * w * h * 3, f"peak {peak / 1e6:.1f} MB for a {w * h * 3 / 1e6:.1f} MB image"
    with openslide.OpenSlide(path) as s:
        assert s.dimensions == (w, h) and s.level_count == 4
        assert s.properties["openslide.mpp-x"] == "0.25"
        tile = np.asarray(s.read_region((w // 2, h // 2), 0, (256, 256)))
        assert tile[..., 3].min() == 255


def test_demo_slide_is_committed_and_small():
    demo = REPO / "examples" / "slides" / "demo.svs"
    assert demo.exists() and demo.stat().st_size < 5_000_000
    with openslide.OpenSlide(demo) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert s.properties["openslide.objective-power"] == "40"
