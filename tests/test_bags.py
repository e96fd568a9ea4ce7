"""Feature bags: real HDF5 files written, validated and read back (design §4)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mstar_extract import __version__
from mstar_extract.store.bags import COORDS_ATTRS, REQUIRED_ROOT_ATTRS, bag_attrs, read_bag, validate_bag, write_bag, write_pt
from mstar_extract.tiling import ReadPlan


def _plan(n: int) -> ReadPlan:
    xs = np.arange(n, dtype=np.int64) * 512
    return ReadPlan(
        coords=np.stack([xs, xs // 2], 1),
        level=0,
        level_downsample=1.0,
        read_size=512,
        patch_size=256,
        patch_size_level0=512,
        target_mpp=0.5,
        target_magnification=20.0,
        level0_mpp=0.25,
        level0_magnification=40.0,
        level0_width=100_000,
        level0_height=80_000,
        settings={"min_tissue": 0.25, "seg_level": 2},
    )


def _attrs(plan: ReadPlan, dim: int, **kw: object) -> dict:
    return bag_attrs(
        plan, slide_id="slideA", slide_path="/data/slideA.svs", model="mstar", weights_sha256="ab" * 32,
        feature_dim=dim, precision="fp32", **kw,
    )


def _write(tmp_path: Path, n: int = 300, dim: int = 1024, dtype: str = "float32",
           **kw: object) -> tuple[Path, np.ndarray, ReadPlan]:
    plan = _plan(n)
    feats = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    path = write_bag(tmp_path / "features" / "slideA.h5", feats, plan.coords, _attrs(plan, dim, **kw), dtype=dtype)
    return path, feats, plan


def test_round_trip_float32_with_all_attrs(tmp_path: Path) -> None:
    path, feats, plan = _write(tmp_path)
    assert validate_bag(path) is None
    bag = read_bag(path)
    assert bag.features.dtype == np.float32 and bag.features.shape == (300, 1024)
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, plan.coords)
    for key in REQUIRED_ROOT_ATTRS:
        assert key in bag.attrs, key
    assert bag.attrs["mstar_extract_version"] == __version__
    assert bag.attrs["created"].endswith("+00:00")
    assert bag.attrs["settings"] == {"min_tissue": 0.25, "seg_level": 2}
    assert bag.attrs["feature_dim"] == 1024 and bag.attrs["input_size"] == 224
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["level0_mpp"] == 0.25
    assert bag.attrs["complete"] == 1 and bag.attrs["n_patches"] == 300
    # TRIDENT's keys on coords, with the values of the plan
    assert set(COORDS_ATTRS) <= set(bag.coords_attrs)
    assert bag.coords_attrs["name"] == "slideA"
    assert bag.coords_attrs["patch_size"] == 256 and bag.coords_attrs["patch_size_level0"] == 512
    assert bag.coords_attrs["target_magnification"] == 20.0 and bag.coords_attrs["level0_width"] == 100_000
    # settings are stored as a JSON string in the file itself
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["settings"]) == {"min_tissue": 0.25, "seg_level": 2}
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp left over


def test_float16_and_expectations(tmp_path: Path) -> None:
    path, feats, _ = _write(tmp_path, n=50, dim=64, dtype="float16")
    bag = read_bag(path)
    assert bag.features.dtype == np.float16
    np.testing.assert_allclose(bag.features.astype(np.float32), feats, rtol=1e-3, atol=1e-3)
    assert validate_bag(path, {"dtype": "float16", "n_patches": 50, "feature_dim": 64, "model": "mstar"}) is None
    assert "float16" in validate_bag(path, {"dtype": "float32"})
    assert "patches" in validate_bag(path, {"n_patches": 51})
    assert "feature_dim" in validate_bag(path, {"feature_dim": 1024})
    assert "weights_sha256" in validate_bag(path, {"weights_sha256": "cd" * 32})
    assert validate_bag(path, {"target_mpp": 0.5, "level0_mpp": 0.25}) is None


def test_coords_expectation(tmp_path: Path) -> None:
    path, _, plan = _write(tmp_path, n=20, dim=8)
    assert validate_bag(path, {"coords": plan.coords}) is None
    moved = plan.coords.copy()
    moved[3, 0] += 16
    assert "coords differ" in validate_bag(path, {"coords": moved})


def test_features_chunked_in_row_blocks(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path, n=1000, dim=1024)
    with h5py.File(path, "r") as f:
        rows, cols = f["features"].chunks
    assert cols == 1024
    assert 64 <= rows <= 1000  # blocks of rows, not one chunk per row
    assert rows == 256  # ~1 MiB per chunk for float32 x 1024


def test_empty_bag_is_valid(tmp_path: Path) -> None:
    plan = _plan(0)
    path = write_bag(tmp_path / "e.h5", np.zeros((0, 1024), np.float32), plan.coords, _attrs(plan, 1024))
    assert validate_bag(path, {"n_patches": 0, "feature_dim": 1024}) is None
    bag = read_bag(path)
    assert bag.features.shape == (0, 1024) and bag.coords.shape == (0, 2)
    assert len(bag) == 0


def test_truncated_and_garbage_files_are_invalid(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path, n=400, dim=256)
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    reason = validate_bag(cut)
    assert reason is not None and "\n" not in reason
    assert "truncated" in reason or "not a readable" in reason
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    assert "not a readable HDF5" in validate_bag(junk)
    assert validate_bag(tmp_path / "absent.h5") == "missing"


def test_incomplete_or_inconsistent_files_are_invalid(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path, n=10, dim=8)
    # a copy without the completion marker
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    assert validate_bag(path) == "not marked complete"
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("features", data=np.zeros((5, 8), np.float32))
        f.create_dataset("coords", data=np.zeros((4, 2), np.int64))
    assert validate_bag(other) == "5 feature rows but 4 coords"
    with h5py.File(other, "w") as f:
        f.create_dataset("features", data=np.zeros((5, 8), np.float32))
    assert validate_bag(other) == "no 'coords' dataset"
    with h5py.File(other, "w") as f:
        f.create_dataset("features", data=np.zeros((5, 8), np.float32))
        f.create_dataset("coords", data=np.zeros((5, 2), np.int64))
    assert validate_bag(other).startswith("attrs missing: slide_id")


def test_write_refuses_bad_input_and_leaves_nothing(tmp_path: Path) -> None:
    plan = _plan(3)
    out = tmp_path / "features"
    with pytest.raises(ValueError, match="3 feature rows but 2"):
        write_bag(out / "x.h5", np.zeros((3, 8)), plan.coords[:2], _attrs(plan, 8))
    with pytest.raises(ValueError, match="attrs missing: slide_path"):
        attrs = _attrs(plan, 8)
        del attrs["slide_path"]
        write_bag(out / "x.h5", np.zeros((3, 8)), plan.coords, attrs)
    with pytest.raises(TypeError):  # h5py cannot store an arbitrary object: the temp file is removed
        write_bag(out / "x.h5", np.zeros((3, 8)), plan.coords, _attrs(plan, 8, weird=object()))
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_numbers_round_trip_as_none(tmp_path: Path) -> None:
    plan = _plan(2)
    plan.level0_mpp = None
    plan.target_magnification = None
    path = write_bag(tmp_path / "n.h5", np.ones((2, 4)), plan.coords, _attrs(plan, 4))
    bag = read_bag(path)
    assert bag.attrs["level0_mpp"] is None and bag.attrs["target_magnification"] is None
    assert bag.coords_attrs["target_magnification"] is None
    with h5py.File(path, "r") as f:  # stored as NaN (HDF5 has no null)
        assert np.isnan(f.attrs["level0_mpp"])
    assert validate_bag(path, {"level0_mpp": None}) is None


def test_write_pt(tmp_path: Path) -> None:
    feats = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float16)
    path = write_pt(tmp_path / "pt_files" / "slideA.pt", feats)
    t = torch.load(path, weights_only=True)
    assert t.dtype == torch.float32 and tuple(t.shape) == (7, 16)
    np.testing.assert_allclose(t.numpy(), feats.astype(np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["slideA.pt"]
