"""Coordinate files: TRIDENT (default) and CLAM semantics written, read back, and read by independent code."""

from __future__ import annotations

import h5py
import numpy as np
import openslide
import pytest

from mstar_extract.slides import open_slide
from mstar_extract.store.coords import CoordsFormatError, find_coords_file, is_complete_coords, read_coords_file, write_coords
from mstar_extract.tiling import TilingParams, plan_tiles
from mstar_extract.tissue import segment_slide

TRIDENT_KEYS = {"patch_size", "patch_size_level0", "target_magnification", "level0_magnification", "level0_width",
                "level0_height", "overlap", "name"}
CLAM_KEYS = {"patch_level", "patch_size", "downsample", "level_dim", "downsampled_level_dim", "name"}


@pytest.fixture(scope="module")
def plan10x(fixture_slides):
    """svs40 tiled at 10x: downsample 4 -> pyramid level 1 (not level 0), read 256 px there."""
    with open_slide(fixture_slides["svs40"].path) as slide:
        plan = plan_tiles(slide, segment_slide(slide), TilingParams(magnification=10, patch_size=256, min_tissue=0.2))
        dims = slide.level_dimensions
    assert len(plan) > 0 and plan.level == 1 and plan.read_size == 256 and plan.patch_size_level0 == 1024
    return plan, dims


def test_trident_format_round_trip(tmp_path, fixture_slides, plan10x) -> None:
    plan, dims = plan10x
    p = write_coords(tmp_path / "coords" / "svs40.h5", plan, "svs40", "x.svs", "trident", dims)
    with h5py.File(p, "r") as f:
        a = f["coords"].attrs
        assert TRIDENT_KEYS <= set(a)
        assert a["patch_size"] == 256 and a["patch_size_level0"] == 1024
        assert a["target_magnification"] == 10 and a["level0_magnification"] == 40
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(plan), 2)
        assert a["name"] == "svs40"
    with open_slide(fixture_slides["svs40"].path) as slide:
        back = read_coords_file(p, slide)
    assert back.source == "mstar"
    np.testing.assert_array_equal(back.coords, plan.coords)
    for k in ("level", "read_size", "patch_size", "patch_size_level0", "level0_width", "level0_height", "overlap"):
        assert getattr(back, k) == getattr(plan, k), k
    assert back.target_mpp == pytest.approx(0.5 * 2)
    assert is_complete_coords(p)


def test_clam_file_read_by_independent_reader(tmp_path, fixture_slides, plan10x) -> None:
    """An independent CLAM-style reader (openslide read_region at patch_level with patch_size, as CLAM's
    extract_features_fp does) gets the same pixels as reading the TRIDENT-format plan."""
    plan, dims = plan10x
    clam = write_coords(tmp_path / "clam.h5", plan, "svs40", "x.svs", "clam", dims)
    trident = write_coords(tmp_path / "trident.h5", plan, "svs40", "x.svs", "trident", dims)
    with h5py.File(clam, "r") as f:
        a = dict(f["coords"].attrs)
        clam_coords = f["coords"][()]
    assert CLAM_KEYS <= set(a)
    assert int(a["patch_level"]) == 1 and int(a["patch_size"]) == 256
    assert tuple(a["level_dim"]) == dims[1] and tuple(a["downsampled_level_dim"]) == dims[1]
    assert tuple(a["downsample"]) == pytest.approx((4.0, 4.0))
    osl = openslide.OpenSlide(str(fixture_slides["svs40"].path))
    try:
        with open_slide(fixture_slides["svs40"].path) as slide:
            tplan = read_coords_file(trident, slide)
        level, size = int(a["patch_level"]), int(a["patch_size"])
        for i in range(0, len(clam_coords), max(1, len(clam_coords) // 6)):
            x, y = (int(v) for v in clam_coords[i])
            clam_px = np.asarray(osl.read_region((x, y), level, (size, size)).convert("RGB"))
            tx, ty = (int(v) for v in tplan.coords[i])
            ours = np.asarray(osl.read_region((tx, ty), tplan.level, (tplan.read_size, tplan.read_size)).convert("RGB"))
            np.testing.assert_array_equal(clam_px, ours)
            assert clam_px.std() > 5  # on tissue, not blank
        # the read footprint at level 0 is the TRIDENT patch_size_level0
        assert size * osl.level_downsamples[level] == pytest.approx(tplan.patch_size_level0)
    finally:
        osl.close()
    with open_slide(fixture_slides["svs40"].path) as slide:
        back = read_coords_file(clam, slide)
    assert back.level == 1 and back.read_size == 256 and back.patch_size_level0 == 1024


def test_foreign_trident_and_clam_files(tmp_path, fixture_slides) -> None:
    coords = np.array([[0, 0], [512, 1024]], np.int64)
    tri = tmp_path / "patches" / "svs40_patches.h5"
    tri.parent.mkdir()
    with h5py.File(tri, "w") as f:  # what TRIDENT writes (no mstar_* attrs)
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20,
                        "level0_magnification": 40, "overlap": 0, "name": "svs40", "savetodir": "x"})
    clam = tmp_path / "clam" / "svs40.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as f:  # what CLAM's create_patches_fp.py writes
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 512, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                        "downsampled_level_dim": np.array([6000, 4000]), "level_dim": np.array([6000, 4000]),
                        "name": "svs40", "save_path": "x"})
    assert find_coords_file(tmp_path, "svs40") == tri
    assert find_coords_file(tmp_path / "clam", "svs40") == clam
    assert find_coords_file(tmp_path, "nope") is None
    with open_slide(fixture_slides["svs40"].path) as slide:
        t = read_coords_file(tri, slide)
        c = read_coords_file(clam, slide)
    assert t.source == "trident" and t.level == 0 and t.read_size == 512 and t.patch_size == 256
    assert t.target_mpp == pytest.approx(0.5) and t.level0_width == 6000
    assert c.source == "clam" and c.level == 0 and c.read_size == 512 and c.patch_size_level0 == 512
    np.testing.assert_array_equal(t.coords, coords)
    # TRIDENT at 5x on this slide: downsample 8 -> level 1 (ds 4), read 1024/4
    with h5py.File(tri, "a") as f:
        f["coords"].attrs["patch_size_level0"] = 2048
        f["coords"].attrs["target_magnification"] = 5
    with open_slide(fixture_slides["svs40"].path) as slide:
        t5 = read_coords_file(tri, slide)
    assert t5.level == 1 and t5.read_size == 512


def test_bad_coordinate_files(tmp_path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    assert not is_complete_coords(junk)
    with pytest.raises(CoordsFormatError, match="not a readable HDF5"):
        read_coords_file(junk)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    with pytest.raises(CoordsFormatError, match="CLAM"):
        read_coords_file(bare)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 2)))
    with pytest.raises(CoordsFormatError, match="no 'coords'"):
        read_coords_file(wrong)


@pytest.mark.parametrize("fmt, attrs, missing", [
    ("TRIDENT", {"patch_size_level0": 512, "target_magnification": 20.0}, "patch_size"),
    ("mstar", {"mstar_read_size": 256, "mstar_level": 0, "mstar_level_downsample": 1.0, "mstar_patch_size": 256,
               "mstar_target_mpp": 0.5}, "mstar_patch_size_level0"),
])
def test_missing_attribute_is_a_format_error_not_a_type_error(tmp_path, fmt, attrs, missing) -> None:
    """A file recognised as one format but lacking one of its attributes is a CoordsFormatError naming it."""
    p = tmp_path / f"{fmt}.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v
    with pytest.raises(CoordsFormatError, match=f"{fmt}.*'{missing}'"):
        read_coords_file(p)
