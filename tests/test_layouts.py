"""Output layouts ``--layout mstar|clam|trident`` (issue 13 item 1), through real CLI runs on real slides.

* ``clam``: ``patches/<id>.h5`` read back by an independent OpenSlide ``read_region`` reader written here, at
  exactly CLAM's ``patch_level`` + ``patch_size`` (the footprint is checked against the slide's truth, and the
  patches it reads reproduce the stored features; the mSTAR repo's fallback of 512 px at level 0 does not);
  ``h5_files/`` and ``pt_files/`` as CLAM's ``extract_features_fp.py`` writes them;
* ``trident``: TRIDENT's job folder, file names and attributes as TRIDENT's ``coords_to_h5``, ``read_coords`` and
  ``extract_patch_features`` write and read them;
* every layout: a rerun skips every slide and rewrites nothing, ``mstar status`` and ``mstar report`` read OUT
  without being told its layout, ``--coords-dir`` finds each layout's coordinates, and a run with another layout
  on the same OUT refuses before any work (``--overwrite`` too).

The peers' own loaders (CLAM, TRIDENT, the mSTAR repo) are run on these layouts by
``examples/layouts/peer_loaders.py`` (docs/layouts.md); tests need no network and no checkout of theirs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from mstar_extract.cli import main as cli_main
from mstar_extract.errors import UsageError
from mstar_extract.store.coords import CoordsFormatError, find_coords_file
from mstar_extract.store.layout import LAYOUTS, layout_from_record, make_layout, trident_encoder_name
from mstar_extract.store.record import recorded_layout
from mstar_extract.testing.fixtures import make_svs
from mstar_extract.testing.scene import random_scene

TINY = "timm:test_vit"
RUN = ["--model", TINY, "--weights", "random", "--device", "cpu", "--workers", "0", "--batch-size", "16"]
TRIDENT_JOB = "20x_256px_0px_overlap"
TRIDENT_FEATS = "features_timm-test_vit"
SLIDES = {"svs40": 0.25, "svs40_l2": 0.25, "svs20": 0.5}
"""Slides with tissue and their level-0 mpp: a 40x scan without a 2x level (20x patches read at level 0, 512 px),
one with a 2x level (read at level 1, 256 px), and a 20x scan (level 0, 256 px)."""


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def files_with_mtimes(root: Path) -> dict[str, int]:
    """Every output file but the run's bookkeeping (manifest, report, settings record, hidden files)."""
    skip = ("manifest", "report", ".")
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not str(p.relative_to(root)).startswith(skip) and p.name != "mstar_settings.json"}


@pytest.fixture(scope="module")
def slides(fixture_slides, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("layout_slides")
    for name in ("svs40", "svs20", "glass_only"):
        shutil.copy(fixture_slides[name].path, folder / f"{name}.svs")
    make_svs(folder / "svs40_l2.svs", random_scene(1500.0, 1000.0, seed=1, border=True), 0.25, 40, levels=(1, 2, 8))
    return folder


@pytest.fixture(scope="module")
def outs(slides: Path, tmp_path_factory) -> dict[str, tuple[Path, Result]]:
    """``mstar extract`` of the four slides in each layout: {layout: (OUT, result)}."""
    root = tmp_path_factory.mktemp("layouts")
    done = {}
    for layout in LAYOUTS:
        out = root / f"out_{layout}"
        r = cli("extract", slides, out, "--layout", layout, *RUN)
        assert r.exit_code == 0, r.output
        done[layout] = (out, r)
    return done


@pytest.fixture(scope="module")
def encoder():
    """The network the runs used (random weights are seeded: the same in every process)."""
    from mstar_extract.models import Encoder

    return Encoder.create(TINY, "random", device="cpu", precision="fp32")


def embed(encoder, patches: list[np.ndarray]) -> np.ndarray:
    from mstar_extract.reading.resize import resize_patch

    return encoder.embed(np.stack([resize_patch(np.ascontiguousarray(p), encoder.spec.input_size) for p in patches])).numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ------------------------------------------------------------------------------------------------ the paths
def test_each_layout_names_the_files_its_readers_look_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    clam = make_layout(out, "clam").slide("TCGA-01")
    assert (clam.coords, clam.bag, clam.pt, clam.qc) == (out / "patches/TCGA-01.h5", out / "h5_files/TCGA-01.h5",
                                                        out / "pt_files/TCGA-01.pt", out / "masks/TCGA-01.jpg")
    from mstar_extract.store.layout import LayoutContext

    tri = make_layout(out, "trident", LayoutContext(magnification=20.0, patch_size=256, overlap=0, model="uni")).slide("s")
    assert tri.coords == out / TRIDENT_JOB / "patches" / "s_patches.h5"
    assert tri.bag == out / TRIDENT_JOB / "features_uni_v1" / "s.h5"  # TRIDENT's name for the same UNI weights
    assert (tri.qc, tri.contours, tri.thumbnail) == (out / "contours/s.jpg", out / "contours_geojson/s.geojson",
                                                     out / "thumbnails/s.jpg")
    half = make_layout(out, "trident", LayoutContext(magnification=2.5, patch_size=224, overlap=32))
    assert half.coords("s").parent.parent.name == "2.5x_224px_32px_overlap"  # TRIDENT's _fmt_mag
    assert trident_encoder_name("timm:vit_small_patch16_224") == "timm-vit_small_patch16_224"
    for layout in LAYOUTS:  # the id rules hold in every layout
        with pytest.raises(UsageError):
            make_layout(out, layout, LayoutContext(20.0, 256, 0)).bag("../escape")
    # a record written before layouts existed stands for the mstar layout
    assert layout_from_record(out, {"tiling": {"patch_size": 256}}).name == "mstar"


def test_coords_format_contradicting_the_layout_is_a_usage_error(slides: Path, tmp_path: Path) -> None:
    r = cli("tile", slides / "svs20.svs", tmp_path / "out", "--layout", "clam", "--coords-format", "trident")
    assert r.exit_code == 2 and "--layout clam writes clam coordinates" in r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ clam
def test_clam_coords_are_read_at_exactly_their_footprint(outs, slides: Path, encoder) -> None:
    import openslide

    out = outs["clam"][0]
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {"patches", "h5_files", "pt_files", "masks", "contours"}
    assert not (out / "features").exists() and not (out / "coords").exists()
    levels = {}
    for sid, mpp in SLIDES.items():
        osr = openslide.OpenSlide(str(slides / f"{sid}.svs"))
        with h5py.File(out / "patches" / f"{sid}.h5", "r") as f:
            coords, a = f["coords"][()], dict(f["coords"].attrs)
        # the attributes CLAM's create_patches_fp.py writes (WholeSlideImage.process_contour)
        assert {"patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name",
                "save_path"} <= set(a)
        level, size = int(a["patch_level"]), int(a["patch_size"])
        levels[sid] = (level, size)
        assert a["name"] == sid and a["save_path"] == str(out / "patches")
        assert tuple(a["level_dim"]) == osr.level_dimensions[level]
        np.testing.assert_allclose(a["downsample"], osr.level_downsamples[level], rtol=1e-6)
        # CLAM's reader: read_region(xy, patch_level, (patch_size, patch_size)); its footprint is a 20x patch
        assert size * osr.level_downsamples[level] == pytest.approx(256 * 0.5 / mpp)
        patches = [np.asarray(osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB")) for x, y in coords]
        with h5py.File(out / "h5_files" / f"{sid}.h5", "r") as f:
            feats, bag_coords = f["features"][()], f["coords"][()]
        np.testing.assert_array_equal(bag_coords, coords)
        assert min_cosine(embed(encoder, patches), feats) > 0.9999, sid
        # pt_files/<id>.pt: what CLAM's extract_features_fp.py saves (torch.save of the float32 (N, D) tensor)
        pt = torch.load(out / "pt_files" / f"{sid}.pt")
        assert pt.dtype == torch.float32 and np.array_equal(pt.numpy(), feats)
    assert levels == {"svs40": (0, 512), "svs40_l2": (1, 256), "svs20": (0, 256)}
    # the comparison can fail: the mSTAR repo's fallback for coordinates without patch_level (512 px at level 0)
    osr = openslide.OpenSlide(str(slides / "svs20.svs"))
    with h5py.File(out / "h5_files" / "svs20.h5", "r") as f:
        feats, coords = f["features"][()], f["coords"][()]
    wrong = [np.asarray(osr.read_region((int(x), int(y)), 0, (512, 512)).convert("RGB")) for x, y in coords]
    assert min_cosine(embed(encoder, wrong), feats) < 0.99


def test_clam_layout_always_writes_pt_files_and_its_coords_are_found(outs, slides: Path, tmp_path: Path) -> None:
    out = outs["clam"][0]
    assert find_coords_file(out, "svs20") == out / "patches" / "svs20.h5"
    r = cli("extract", slides / "svs20.svs", tmp_path / "again", "--layout", "clam", "--format", "h5", *RUN,
            "--coords-dir", out, "--no-report")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "pt_files" / "svs20.pt").is_file()  # --format h5: pt_files all the same
    with h5py.File(tmp_path / "again" / "h5_files" / "svs20.h5", "r") as a, h5py.File(out / "h5_files" / "svs20.h5", "r") as b:
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
        assert a.attrs["coords_source"] == "mstar"


# ------------------------------------------------------------------------------------------------ trident
def test_trident_job_folder_as_trident_writes_and_reads_it(outs, slides: Path, encoder) -> None:
    import openslide

    out = outs["trident"][0]
    job = out / TRIDENT_JOB
    for sid, mpp in SLIDES.items():
        # <job>/<mag>x_<ps>px_<overlap>px_overlap/patches/<id>_patches.h5 with coords_to_h5's attributes
        with h5py.File(job / "patches" / f"{sid}_patches.h5", "r") as f:
            coords, a = f["coords"][()], dict(f["coords"].attrs)
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name",
                "savetodir", "level0_width", "level0_height"} <= set(a)
        assert (a["name"], a["savetodir"], int(a["overlap"])) == (sid, str(job), 0)
        assert (int(a["patch_size"]), float(a["target_magnification"])) == (256, 20.0)
        assert float(a["level0_magnification"]) == 10.0 / mpp
        # TRIDENT's patch_size_level0 = patch_size * src_mag // target_mag, and what its patcher reads
        assert int(a["patch_size_level0"]) == 256 * int(a["level0_magnification"]) // int(a["target_magnification"])
        # features_<encoder>/<id>.h5: features + coords, with extract_patch_features' attributes
        with h5py.File(job / TRIDENT_FEATS / f"{sid}.h5", "r") as f:
            feats, bag_coords = f["features"][()], f["coords"][()]
            fa, ca = dict(f["features"].attrs), dict(f["coords"].attrs)
        assert fa == {"name": sid, "savetodir": str(job / TRIDENT_FEATS), "encoder": "timm-test_vit"}
        assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification"} <= set(ca)
        np.testing.assert_array_equal(bag_coords, coords)
        # the footprint TRIDENT reads (level-0 patch_size_level0) gives the stored features
        s0 = int(a["patch_size_level0"])
        osr = openslide.OpenSlide(str(slides / f"{sid}.svs"))
        patches = [np.asarray(osr.read_region((int(x), int(y)), 0, (s0, s0)).convert("RGB")) for x, y in coords]
        assert min_cosine(embed(encoder, patches), feats) > 0.999, sid
        # segmentation outputs where TRIDENT's segmentation job puts them
        for picture in (out / "thumbnails" / f"{sid}.jpg", out / "contours" / f"{sid}.jpg"):
            assert picture.read_bytes()[:3] == b"\xff\xd8\xff", picture
        geo = json.loads((out / "contours_geojson" / f"{sid}.geojson").read_text())
        classes = {ft["properties"]["classification"]["name"] for ft in geo["features"]}
        assert classes == {"Tissue"}  # TRIDENT reads every polygon there as tissue: no pen outlines
    from PIL import Image

    assert max(Image.open(out / "thumbnails" / "svs40.jpg").size) <= 1000
    assert not (out / "features").exists() and not (out / "coords").exists()


def test_coords_dir_finds_trident_job_folders(outs, tmp_path: Path) -> None:
    out = outs["trident"][0]
    assert find_coords_file(out, "svs20") == out / TRIDENT_JOB / "patches" / "svs20_patches.h5"
    assert find_coords_file(out / TRIDENT_JOB, "svs20") == out / TRIDENT_JOB / "patches" / "svs20_patches.h5"
    assert find_coords_file(out, "nope") is None
    other = out / "40x_256px_0px_overlap" / "patches"
    other.mkdir(parents=True)
    shutil.copy(out / TRIDENT_JOB / "patches" / "svs20_patches.h5", other / "svs20_patches.h5")
    try:
        with pytest.raises(CoordsFormatError, match="2 TRIDENT patching folders"):
            find_coords_file(out, "svs20")
    finally:
        shutil.rmtree(other.parent)


# ------------------------------------------------------------------------------------------------ every layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rerun_skips_and_status_report_coords_dir_work(layout: str, outs, slides: Path, tmp_path: Path) -> None:
    from mstar_extract.report.build import build_report

    out, _ = outs[layout]
    before = files_with_mtimes(out)
    r = cli("extract", slides, out, "--layout", layout, *RUN, "--jsonl", "--no-report")
    assert r.exit_code == 0, r.output
    finals = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert sorted(e["event"] for e in finals if "slide_id" in e and e["event"] != "started") == ["skipped"] * 4
    assert files_with_mtimes(out) == before  # nothing rewritten
    # status and report, without being told the layout
    st = cli("status", out, "--json")
    assert st.exit_code == 0, st.output
    assert json.loads(st.stdout)["summary"]["counts"]["done"] == 3
    result = build_report(out, rebuild=True)
    assert result.n_slides == 4 and result.rendered["maps"] == 3 and result.rendered["thumbs"] == 4
    # this OUT as --coords-dir of another run: the same coordinates
    again = tmp_path / "again"
    r = cli("extract", slides / "svs40_l2.svs", again, "--coords-dir", out, *RUN, "--no-report")
    assert r.exit_code == 0, r.output
    bag = recorded_layout(out).bag("svs40_l2")  # the layout OUT's settings record names
    assert bag.relative_to(out).parts[0] == {"mstar": "features", "clam": "h5_files", "trident": TRIDENT_JOB}[layout]
    with h5py.File(again / "features" / "svs40_l2.h5", "r") as a, h5py.File(bag, "r") as b:
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])


@pytest.mark.parametrize("layout,other", [("mstar", "clam"), ("clam", "trident"), ("trident", "mstar")])
def test_another_layout_on_the_same_out_refuses_before_work(layout: str, other: str, outs, slides: Path) -> None:
    out, _ = outs[layout]
    before = files_with_mtimes(out)
    record = (out / "mstar_settings.json").read_text()
    for extra in ([], ["--overwrite"]):
        for cmd in (["tile"], ["extract", *RUN]):
            r = cli(*cmd[:1], slides / "svs20.svs", out, "--layout", other, *cmd[1:], *extra)
            assert r.exit_code == 2, r.output
            assert f"--layout {other} (OUT has {layout})" in r.output and "cannot change in place" in r.output
    assert files_with_mtimes(out) == before and (out / "mstar_settings.json").read_text() == record


def test_a_record_from_before_layouts_is_the_mstar_layout(outs, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(outs["mstar"][0], out)
    doc = json.loads((out / "mstar_settings.json").read_text())
    del doc["output"]
    (out / "mstar_settings.json").write_text(json.dumps(doc))
    r = cli("tile", slides / "svs20.svs", out, "--layout", "clam")
    assert r.exit_code == 2 and "--layout clam (OUT has mstar)" in r.output
    r = cli("tile", slides / "svs20.svs", out, "--no-report")
    assert r.exit_code == 0, r.output
    assert recorded_layout(out).name == "mstar"


# ------------------------------------------------------------------------------------------------ the warning
def test_extract_and_tile_warn_once_when_clam_style_readers_would_misread(outs, slides: Path, tmp_path: Path) -> None:
    lines = lambda r: [ln for ln in r.output.splitlines() if "misread by CLAM-style readers" in ln]  # noqa: E731
    warned = lines(outs["mstar"][1])
    assert len(warned) == 1 and "coords/svs20.h5" in warned[0] and "use --layout clam" in warned[0]
    assert "512 px at level 0 for patches of 256 level-0 px (4x their area)" in warned[0]
    assert not lines(outs["clam"][1]) and not lines(outs["trident"][1])
    r = cli("tile", slides / "svs40.svs", tmp_path / "t40")  # 512 level-0 px: the fallback happens to be right
    assert r.exit_code == 0 and not lines(r)
    r = cli("tile", slides / "svs20.svs", tmp_path / "t20", "--no-report")
    assert r.exit_code == 0 and len(lines(r)) == 1
