"""Tiling: magnification rules, read plans, and patch-level quality against fixture ground truth."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from mstar_extract.errors import ResolutionError
from mstar_extract.slides import open_slide
from mstar_extract.testing.fixtures import load_truth, make_svs, save_truth
from mstar_extract.testing.scene import Blob, Scene, random_scene
from mstar_extract.tiling import (
    TilingParams,
    choose_level,
    grid_coords,
    grid_geometry,
    plan_tiles,
    snap_magnification,
    tissue_fractions,
)
from mstar_extract.tissue import segment_slide


# ------------------------------------------------------------------------------------------- pure maths
def test_snap_and_geometry() -> None:
    assert snap_magnification(10 / 0.2527) == 40 and snap_magnification(10 / 0.4990) == 20
    assert snap_magnification(10 / 0.2265) == 40  # Hamamatsu 40x
    assert snap_magnification(31.0) is None
    g = grid_geometry(0.2527, TilingParams())
    assert g.snapped and g.downsample == 2.0 and g.patch_size_level0 == 512 and g.level0_magnification == 40
    e = grid_geometry(0.2527, TilingParams(exact_mpp=True))
    assert not e.snapped and e.downsample == pytest.approx(0.5 / 0.2527) and e.patch_size_level0 == round(256 * 0.5 / 0.2527)
    m = grid_geometry(0.25, TilingParams(magnification=None, mpp=1.0, patch_size=224))
    assert m.downsample == 4.0 and m.patch_size_level0 == 896 and m.target_magnification == 10
    o = grid_geometry(0.5, TilingParams(overlap=56))
    assert o.step_level0 == 200 and o.patch_size_level0 == 256
    with pytest.raises(ValueError):
        TilingParams(overlap=256)


def test_choose_level_never_upsamples() -> None:
    levels = (1.0, 4.0, 16.0)
    assert choose_level(levels, 2.0) == 0
    assert choose_level(levels, 4.0) == 1
    assert choose_level(levels, 3.99) == 0
    assert choose_level(levels, 8.0) == 1
    assert choose_level(levels, 100.0) == 2
    assert choose_level((1.0, 4.0002, 16.001), 4.0) == 1  # rounding of level sizes is tolerated


def test_grid_and_fractions_exact() -> None:
    coords = grid_coords(1000, 600, 256, 256.0)
    assert coords.shape == (3 * 2, 2) and coords.max(axis=0).tolist() == [512, 256]
    assert grid_coords(100, 100, 256, 256.0).shape == (0, 2)
    mask = np.zeros((60, 100), bool)  # mask px = 10 level-0 px
    mask[:, :20] = True  # level-0 x in [0, 200)
    frac = tissue_fractions(coords, 256, mask, 10.0, 10.0)
    assert frac[0] == pytest.approx(200 / 256) and frac[1] == 0.0
    frac2 = tissue_fractions(np.array([[5, 0]]), 10, mask, 10.0, 10.0)
    assert frac2[0] == pytest.approx(1.0)
    half = tissue_fractions(np.array([[195, 0]]), 10, mask, 10.0, 10.0)
    assert half[0] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- read plans
def test_read_plan_levels_on_real_slide(fixture_slides) -> None:
    with open_slide(fixture_slides["svs40"].path) as slide:
        mask = segment_slide(slide)
        p20 = plan_tiles(slide, mask, TilingParams(min_tissue=0.1))
        p10 = plan_tiles(slide, mask, TilingParams(magnification=10, min_tissue=0.1))
        p5 = plan_tiles(slide, mask, TilingParams(magnification=5, min_tissue=0.1))
    assert (p20.level, p20.read_size, p20.patch_size_level0) == (0, 512, 512)
    assert (p10.level, p10.read_size, p10.patch_size_level0) == (1, 256, 1024)
    assert (p5.level, p5.read_size, p5.patch_size_level0) == (1, 512, 2048)
    for p in (p20, p10, p5):
        assert p.read_size * p.level_downsample == p.patch_size_level0
        assert (p.coords % p.patch_size_level0 == 0).all()  # grid anchored at the slide origin
        assert (p.coords[:, 0] + p.patch_size_level0 <= p.level0_width).all()
        assert p.target_mpp == pytest.approx(10 / p.target_magnification)


def test_missing_resolution_is_a_clear_error(fixture_slides) -> None:
    fx = fixture_slides["tiff_nometa"]
    with open_slide(fx.path) as slide:
        with pytest.raises(ResolutionError, match="--mpp-override"):
            plan_tiles(slide, None)  # resolution is checked before the mask is touched
    with open_slide(fx.path, mpp=fx.mpp) as slide:
        plan = plan_tiles(slide, segment_slide(slide))
    assert len(plan) > 0 and plan.patch_size_level0 == 256


# ------------------------------------------------------------------------------------------- 20x vs 40x
def test_20x_and_40x_scans_give_the_same_physical_grid(fixture_slides) -> None:
    plans = {}
    for name in ("svs40", "svs20"):
        with open_slide(fixture_slides[name].path) as slide:
            plans[name] = plan_tiles(slide, segment_slide(slide), TilingParams(min_tissue=0.25))
    a, b = plans["svs40"], plans["svs20"]
    assert a.patch_size_level0 == 2 * b.patch_size_level0
    cells_a = {tuple(c) for c in (a.coords // a.patch_size_level0).tolist()}
    cells_b = {tuple(c) for c in (b.coords // b.patch_size_level0).tolist()}
    assert len(cells_a & cells_b) >= 0.8 * max(len(cells_a), len(cells_b))
    for cell in cells_a ^ cells_b:  # differences only at contour borders: next to a shared patch
        other = cells_b if cell in cells_a else cells_a
        assert any(abs(cell[0] - o[0]) <= 1 and abs(cell[1] - o[1]) <= 1 for o in other), cell


# ------------------------------------------------------------------------------------------- quality
def _truth_metrics(plan, truth) -> dict:
    """Patch-level quality of ``plan`` against ground truth (see docs/tiling.md, 'Quality')."""
    f = truth["slide_mpp"] / truth["mpp"]
    tissue, holes, pen = truth["tissue"], truth["holes"], truth["pen"]
    glass = ~(tissue | holes | pen | truth["dust"] | truth["border"])
    ps = plan.patch_size_level0
    half = int(round(ps * f / 2))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half + 1, 2 * half + 1))
    confident = cv2.erode(tissue.astype(np.uint8), k).astype(bool) & ~cv2.dilate(pen.astype(np.uint8), k).astype(bool)
    covered = np.zeros_like(tissue)
    n_glass = n_pen = n_hole = 0
    for x, y in plan.coords:
        r0, r1, c0, c1 = round(y * f), round((y + ps) * f), round(x * f), round((x + ps) * f)
        covered[r0:r1, c0:c1] = True
        n_glass += glass[r0:r1, c0:c1].mean() > 0.5
        n_pen += truth["pen_on_glass"][r0:r1, c0:c1].mean() > 0.5
        n_hole += bool(holes[int((y + ps / 2) * f), int((x + ps / 2) * f)])
    return {"n": len(plan), "coverage": float((covered & confident).sum() / max(1, confident.sum())),
            "confident_px": int(confident.sum()), "glass": int(n_glass), "pen": int(n_pen), "hole_centres": int(n_hole)}


@pytest.fixture(scope="module")
def pen_slide_40x(tmp_path_factory):
    """A 40x SVS (2.4 x 1.6 mm) with realistic 150-µm pen strokes (blue circle over glass and a tissue edge,
    green line on glass, black stroke across a tissue edge), holes, faint tissue, dust and a dark border."""
    scene = random_scene(2400.0, 1600.0, seed=21, n_blobs=2, border=True)
    scene = dataclasses.replace(scene, strokes=tuple(dataclasses.replace(s, width=150.0) for s in scene.strokes))
    path = tmp_path_factory.mktemp("pen40") / "pen40.svs"
    make_svs(path, scene, mpp=0.25, magnification=40)
    return path, save_truth(path.with_name("pen40.truth.npz"), scene, 0.25)


@pytest.mark.slow
def test_quality_on_40x_slide_with_pen_marks(pen_slide_40x) -> None:
    path, truth_path = pen_slide_40x
    with open_slide(path) as slide:
        plan = plan_tiles(slide, segment_slide(slide))
    m = _truth_metrics(plan, load_truth(truth_path))
    print("quality 40x pen slide:", m)
    assert m["confident_px"] > 10000 and m["n"] > 30
    assert m["coverage"] >= 0.99  # confident tissue covered
    assert m["glass"] <= 0.01 * m["n"]  # patches mostly on bare glass
    assert m["pen"] == 0  # patches mostly on ink over glass
    assert m["hole_centres"] == 0


def test_quality_on_small_fixtures(fixture_slides) -> None:
    for name in ("svs40", "svs20"):
        with open_slide(fixture_slides[name].path) as slide:
            plan = plan_tiles(slide, segment_slide(slide))
        m = _truth_metrics(plan, load_truth(fixture_slides[name].truth_path))
        assert m["n"] > 0 and m["glass"] == 0 and m["pen"] == 0 and m["hole_centres"] == 0, (name, m)


def test_patch_centred_in_a_hole_is_not_kept(tmp_path) -> None:
    # a 20x slide: one 700-µm tissue disc with a 150-µm lumen in its middle
    scene = Scene(2000.0, 1600.0, (Blob(1000.0, 800.0, 700.0),), (Blob(1000.0, 800.0, 150.0),))
    path = make_svs(tmp_path / "hole.svs", scene, mpp=0.5, magnification=20, levels=(1, 4))
    truth = load_truth(save_truth(tmp_path / "hole.truth.npz", scene, 0.5))
    with open_slide(path) as slide:
        mask = segment_slide(slide)
        plan = plan_tiles(slide, mask, TilingParams(min_tissue=0.0))  # even with no tissue minimum
        assert len(mask.contours) == 1 and len(mask.contours[0].holes) == 1
    m = _truth_metrics(plan, truth)
    assert m["hole_centres"] == 0 and m["coverage"] >= 0.99
    centres = plan.coords + plan.patch_size_level0 / 2
    d = np.hypot(centres[:, 0] * 0.5 - 1000.0, centres[:, 1] * 0.5 - 800.0)
    assert (d > 150.0 - 8).all()  # no kept patch centred in the lumen


def test_target_finer_than_level0_is_refused(fixture_slides) -> None:
    from mstar_extract.errors import SlideError

    with open_slide(fixture_slides["svs20"].path) as slide:
        with pytest.raises(SlideError, match="finer than the slide's level 0"):
            plan_tiles(slide, segment_slide(slide), TilingParams(magnification=40))
