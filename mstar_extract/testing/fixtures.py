"""Real test slides: tiled, JPEG-compressed, multi-level pyramidal TIFF/SVS files written with tifffile.

Content comes from :mod:`mstar_extract.testing.scene` (tissue islands textured from a real H&E crop, holes,
faint edges, pen marks, dust, optional dark border), defined in µm so one scene can be written at several
resolutions. Writers:

- :func:`make_svs` — Aperio-style SVS: page 0 = tiled level 0 whose ImageDescription starts with
  ``Aperio Image Library`` and carries ``|AppMag = 40|MPP = 0.25``; page 1 = a small *stripped* thumbnail (as
  in real SVS); then the reduced levels (downsample 4, 16, ...) tiled; then stripped ``label`` and ``macro``
  associated images. OpenSlide (vendor ``aperio``) and tiffslide both read levels, MPP and AppMag.
- :func:`make_tiff` — a generic pyramidal tiled JPEG TIFF without resolution metadata (XResolution 1/1,
  ResolutionUnit NONE, as tifffile writes by default); levels are successive pages marked reduced-resolution,
  which both OpenSlide (``generic-tiff``) and tiffslide read as a pyramid.
- :func:`make_png` — a plain RGB image (no resolution).
- broken inputs: :func:`make_empty`, :func:`make_text_as_svs`, :func:`make_truncated_svs`,
  :func:`make_corrupt_tile_tiff`.
- :func:`make_large_svs` — a big SVS (default 30000x20000) written tile by tile with bounded memory.
- conversions of an SVS by real writers, for the format tests: :func:`make_dicom` (a DICOM WSI series written by
  wsidicomizer, the ``dev`` extra) and :func:`make_ome_tiff` (a pyramidal OME-TIFF written by tifffile with OME
  metadata, levels in SubIFDs). Both keep the SVS's JPEG tiles byte for byte (unless DICOM is asked for JPEG
  2000), so their pixels are the SVS's pixels.

Ground truth (``<slide stem>.truth.npz`` beside each slide, ``np.savez_compressed``) holds boolean masks of the
whole scene at a low resolution: ``tissue`` (stained tissue incl. faint, holes excluded, tissue under ink
included), ``faint``, ``holes`` (lumina/fat inside tissue), ``pen`` (any ink), ``pen_on_glass`` (ink not over
tissue), ``dust``, ``border``; plus ``mpp`` (float, µm/px of the masks; :data:`TRUTH_MPP` = 4.0 unless
given) and ``slide_mpp`` (µm/px of the slide's level 0). Mask pixel (r, c) covers level-0 pixels
``c*mpp/slide_mpp ...``; sizes are ``round(scene size µm / mpp)``. Load with :func:`load_truth`.

Command line: ``python -m mstar_extract.testing.fixtures OUTDIR [--demo]`` builds the fixture set in OUTDIR,
or with ``--demo`` one small 40x demo SVS (``OUTDIR/demo.svs``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mstar_extract.testing.scene import Scene, random_scene, render_region, render_truth

if TYPE_CHECKING:
    import tifffile
    from pydicom import Dataset

TRUTH_MPP = 4.0
APERIO_HEAD = "Aperio Image Library v12.0.15"


@dataclass(frozen=True)
class FixtureSlide:
    """One built fixture. ``mpp``/``magnification`` are the truth of the rendered scene; ``has_mpp`` says
    whether the file's metadata carries it (False for the generic TIFF and the PNG: pass ``mpp`` as override)."""

    path: Path
    kind: str
    """``svs``, ``tiff``, ``png`` or ``broken``."""
    mpp: float | None
    magnification: float | None
    truth_path: Path | None
    has_mpp: bool = True
    extra: dict = field(default_factory=dict)
    """Kind-specific facts, e.g. ``corrupt_tile`` = (x, y, w, h) level-0 box of the corrupt JPEG tile."""


def save_truth(path: Path, scene: Scene, slide_mpp: float, mpp: float = TRUTH_MPP) -> Path:
    """Write the scene's ground-truth masks (see module docstring) to ``path`` (.npz)."""
    masks = render_truth(scene, mpp)
    arrays: dict[str, Any] = {"mpp": np.float64(mpp), "slide_mpp": np.float64(slide_mpp), **masks}
    np.savez_compressed(path, **arrays)
    return path


def load_truth(path: str | os.PathLike) -> dict[str, np.ndarray | float]:
    """Read a ``.truth.npz``: boolean masks plus ``mpp`` and ``slide_mpp`` as floats."""
    with np.load(path) as z:
        out: dict[str, np.ndarray | float] = {k: z[k] for k in z.files}
    out["mpp"] = float(out["mpp"])
    out["slide_mpp"] = float(out["slide_mpp"])
    return out


# ------------------------------------------------------------------------------------------ writing
def _level_sizes(width: int, height: int, downsamples: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(max(1, width // d), max(1, height // d)) for d in downsamples]


def _tiles(scene: Scene, mpp: float, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    """Yield full (tile, tile, 3) tiles row-major, rendering one strip of rows at a time (bounded memory)."""
    for y in range(0, height, tile):
        h = min(tile, height - y)
        strip = render_region(scene, mpp, 0, y, width, h)
        for x in range(0, width, tile):
            out = np.full((tile, tile, 3), 255, np.uint8)
            part = strip[:, x : x + tile]
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def _write_tiled(tw: tifffile.TiffWriter, scene: Scene, mpp: float, size: tuple[int, int], tile: int, quality: int,
                 stream: bool, **kw: Any) -> None:
    w, h = size
    common: dict[str, Any] = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                                  metadata=None)
    if stream:
        tw.write(_tiles(scene, mpp, w, h, tile), shape=(h, w, 3), dtype=np.uint8, **common, **kw)
    else:
        tw.write(render_region(scene, mpp, 0, 0, w, h), **common, **kw)


def _small(scene: Scene, max_side: int) -> np.ndarray:
    scale = max(scene.width_um, scene.height_um) / max_side
    return render_region(scene, scale)


def make_svs(
    path: str | os.PathLike,
    scene: Scene,
    mpp: float = 0.25,
    magnification: float = 40,
    tile: int = 256,
    levels: tuple[int, ...] = (1, 4, 16),
    quality: int = 80,
    *,
    stream: bool = False,
    associated: bool = True,
) -> Path:
    """Write ``scene`` at ``mpp`` as an Aperio-style SVS (see module docstring); returns the path.

    ``levels`` are integer downsamples (first must be 1); each level is rendered from the scene directly at
    ``mpp * downsample``. ``stream=True`` renders tile strips on the fly (for very large slides).
    """
    import tifffile

    path = Path(path)
    if levels[0] != 1:
        raise ValueError("levels must start with downsample 1")
    w0, h0 = scene.size_at(mpp)
    sizes = _level_sizes(w0, h0, levels)
    tail = f"|AppMag = {magnification:g}|StripeWidth = 2040|ScanScope ID = SS1234|Filename = {path.stem}|MPP = {mpp:g}"
    thumb = _small(scene, 768)
    bigtiff = w0 * h0 * 3 > 3_000_000_000
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        desc0 = f"{APERIO_HEAD} \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}{tail}"
        _write_tiled(tw, scene, mpp, sizes[0], tile, quality, stream, description=desc0)
        th, tw_ = thumb.shape[:2]
        tw.write(thumb, compression="jpeg", compressionargs={"level": 90}, photometric="rgb", metadata=None,
                 rowsperstrip=16, description=f"{APERIO_HEAD} \r\n{w0}x{h0} -> {tw_}x{th} - {tail}")
        for ds, (lw, lh) in zip(levels[1:], sizes[1:], strict=True):
            desc = f"{APERIO_HEAD} \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) -> {lw}x{lh} JPEG/RGB Q={quality}{tail}"
            _write_tiled(tw, scene, mpp * ds, (lw, lh), tile, quality, stream,
                         description=desc, subfiletype=0)
        if associated:
            label = np.full((240, 320, 3), 250, np.uint8)
            label[60:180, 40:280] = 30  # a dark "barcode" block
            tw.write(label, compression="lzw", photometric="rgb", metadata=None, rowsperstrip=64,
                     subfiletype=1, description="label 320x240")
            tw.write(_small(scene, 600), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                     metadata=None, rowsperstrip=64, subfiletype=9, description="macro 600x400")
    return path


def make_island_slides(folder: str | os.PathLike, ids: Iterable[str], seed: int) -> dict[str, Path]:
    """Small 20x SVS slides (1600 x 1280 px, 0.5 µm/px, one clear tissue island each: 3-5 patches of 256 px),
    ``<id>.svs`` in ``folder``, the i-th drawn with seed ``seed + i``: the many-small-slides fixture of the CLI
    tests. Returns id -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, sid in enumerate(ids):
        scene = random_scene(800.0, 640.0, seed=seed + i, n_blobs=1, pen=False, dust=False, faint=False)
        out[sid] = make_svs(folder / f"{sid}.svs", scene, mpp=0.5, magnification=20, levels=(1, 4), associated=False)
    return out


def make_tiff(
    path: str | os.PathLike,
    scene: Scene,
    mpp: float = 0.5,
    tile: int = 256,
    levels: tuple[int, ...] = (1, 2, 4, 8),
    quality: int = 80,
) -> Path:
    """Write ``scene`` rendered at ``mpp`` as a generic pyramidal tiled JPEG TIFF *without* resolution metadata."""
    import tifffile

    path = Path(path)
    w0, h0 = scene.size_at(mpp)
    with tifffile.TiffWriter(path) as tw:
        for i, (ds, size) in enumerate(zip(levels, _level_sizes(w0, h0, levels), strict=True)):
            _write_tiled(tw, scene, mpp * ds, size, tile, quality, False, subfiletype=1 if i else 0)
    return path


def make_png(path: str | os.PathLike, scene: Scene, mpp: float = 0.5) -> Path:
    """Write ``scene`` at ``mpp`` as a plain PNG (no resolution metadata)."""
    import cv2

    path = Path(path)
    if not cv2.imwrite(str(path), render_region(scene, mpp)[:, :, ::-1]):
        raise OSError(f"could not write {path}")
    return path


def make_empty(path: str | os.PathLike) -> Path:
    """A zero-byte file (e.g. ``empty.svs``)."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_text_as_svs(path: str | os.PathLike) -> Path:
    """A text file with a slide extension."""
    path = Path(path)
    path.write_text("this is not a slide\njust some text that was saved with the wrong name\n")
    return path


def make_truncated_svs(path: str | os.PathLike, scene: Scene, mpp: float = 0.25) -> Path:
    """A valid SVS cut in the middle (as after an interrupted copy)."""
    path = Path(path)
    make_svs(path, scene, mpp=mpp, magnification=round(10 / mpp))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_corrupt_tile_tiff(path: str | os.PathLike, scene: Scene, mpp: float = 0.5,
                           tile: int = 256) -> tuple[Path, tuple[int, int, int, int]]:
    """A pyramidal TIFF whose structure is valid but one level-0 JPEG tile (in the middle, on tissue when
    possible) holds garbage bytes. Returns the path and the tile's level-0 box (x, y, w, h)."""
    import tifffile

    path = Path(path)
    make_tiff(path, scene, mpp=mpp, tile=tile, levels=(1, 4))
    w0, h0 = scene.size_at(mpp)
    truth = render_truth(scene, TRUTH_MPP)["tissue"]
    across, down = -(-w0 // tile), -(-h0 // tile)
    best, best_score = (across // 2, down // 2), -1.0
    for ty in range(down):
        for tx in range(across):
            r = slice(int(ty * tile * mpp / TRUTH_MPP), int((ty + 1) * tile * mpp / TRUTH_MPP) + 1)
            c = slice(int(tx * tile * mpp / TRUTH_MPP), int((tx + 1) * tile * mpp / TRUTH_MPP) + 1)
            score = float(truth[r, c].mean()) if truth[r, c].size else 0.0
            if score > best_score + 1e-9:
                best, best_score = (tx, ty), score
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        index = best[1] * across + best[0]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    garbage = np.random.default_rng(7).integers(0, 256, count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(garbage)
    x, y = best[0] * tile, best[1] * tile
    return path, (x, y, min(tile, w0 - x), min(tile, h0 - y))


def make_large_svs(path: str | os.PathLike, width: int = 30000, height: int = 20000, mpp: float = 0.25,
                   seed: int = 3, quality: int = 75) -> Path:
    """A large 40x SVS for tiling/reading benchmarks, written tile by tile (memory stays bounded)."""
    scene = random_scene(width * mpp, height * mpp, seed=seed, n_blobs=9)
    return make_svs(path, scene, mpp=mpp, magnification=round(10 / mpp), levels=(1, 4, 16, 64), quality=quality,
                    stream=True)


# ------------------------------------------------------------------------------------------ conversions
def make_dicom(svs: str | os.PathLike, folder: str | os.PathLike, *, jpeg2000: bool = False,
               container_id: str | None = None, objective_power: float | None = None,
               associated: bool = True) -> list[Path]:
    """Convert the SVS ``svs`` into a DICOM WSI series in ``folder`` with wsidicomizer; returns the files written.

    What the converter does (wsidicomizer's opentile source for Aperio SVS): one instance per pyramid level
    (``ImageType`` ``VOLUME``; ``ORIGINAL`` for level 0, ``DERIVED``/``RESAMPLED`` for the others) whose frames are
    the SVS's JPEG tiles copied byte for byte (each padded to an even length, as DICOM requires), plus
    ``LABEL``, ``OVERVIEW`` (the SVS macro) and ``THUMBNAIL`` instances, all in one series; ``PixelSpacing`` from
    the SVS ``MPP``; ``ContainerIdentifier`` ``Unknown`` unless ``container_id`` is given; no objective power
    unless ``objective_power`` is given. Files are named ``<SOPInstanceUID>.dcm``. ``jpeg2000=True`` transcodes
    every tile to lossless JPEG 2000 (``YBR_RCT``) instead, so pixels still equal the SVS's decoded pixels.
    """
    from wsidicomizer import WsiDicomizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def post(ds: Dataset, _meta: Any) -> Dataset:  # wsidicomizer's metadata post-processor callback
        if container_id is not None:
            ds.ContainerIdentifier = container_id
        if objective_power is not None and "OpticalPathSequence" in ds:
            ds.OpticalPathSequence[0].ObjectiveLensPower = objective_power
        return ds

    kw: dict = {}
    if jpeg2000:
        from wsidicom.codec.settings import Jpeg2kSettings

        kw = {"encoding": Jpeg2kSettings(levels=0), "force_transcoding": True}
    files = WsiDicomizer.convert(Path(svs), folder, workers=1, metadata_post_processor=post,
                                 include_label=associated, include_overview=associated, **kw)
    return sorted(Path(f) if Path(f).is_absolute() else Path.cwd() / f for f in files)


def make_ome_tiff(svs: str | os.PathLike, path: str | os.PathLike, *, unit: str = "µm") -> Path:
    """Rewrite the SVS ``svs`` as a pyramidal OME-TIFF with tifffile: level 0 as the first page with OME-XML
    (``PhysicalSizeX/Y`` = the SVS's MPP, expressed in ``unit``: ``µm``, ``nm`` or ``mm``), the reduced levels
    as its SubIFDs (as bioformats2raw/raw2ometiff and QuPath write them), every JPEG tile copied byte for byte
    (same photometric and subsampling). No resolution tags (XResolution 1/1, unit NONE): the OME-XML is the only
    source of the resolution. The SVS thumbnail, label and macro are not copied."""
    import tifffile

    path = Path(path)
    per_um = {"µm": 1.0, "nm": 1000.0, "mm": 0.001}[unit]
    with tifffile.TiffFile(svs) as src:
        mpp = float(src.pages[0].description.split("MPP = ")[1].split("|")[0])
        levels = [p for p in src.pages if p.is_tiled]
        fh = src.filehandle

        def tiles(page: tifffile.TiffPage) -> Iterator[bytes]:
            for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(off)
                yield fh.read(cnt)

        with tifffile.TiffWriter(path, ome=True) as tw:
            for i, page in enumerate(levels):
                kw = dict(tile=(page.tilelength, page.tilewidth), compression="jpeg", photometric=page.photometric,
                          subsampling=getattr(page, "subsampling", None), dtype=np.uint8,
                          shape=(page.imagelength, page.imagewidth, 3))
                if i == 0:
                    meta = {"axes": "YXS", "Name": path.name.split(".")[0], "PhysicalSizeX": mpp * per_um,
                            "PhysicalSizeXUnit": unit, "PhysicalSizeY": mpp * per_um, "PhysicalSizeYUnit": unit}
                    tw.write(tiles(page), subifds=len(levels) - 1, metadata=meta, **kw)
                else:
                    tw.write(tiles(page), subfiletype=1, metadata=None, **kw)
    return path


# ------------------------------------------------------------------------------------------ the set
def build_fixture_set(folder: str | os.PathLike, small: bool = True) -> dict[str, FixtureSlide]:
    """Build every fixture under ``folder``; returns name -> :class:`FixtureSlide`.

    Layout (so a folder can be given to ``mstar`` as a whole):
    ``slides/`` svs40.svs, svs20.svs, glass_only.svs (all with metadata) + their ``.truth.npz``;
    ``nometa/`` tiff_nometa.tiff, png_small.png (need an mpp override) + truth;
    ``broken/`` empty.svs, text.svs, truncated.svs, corrupt_tile.tiff.
    svs40 and svs20 are the same scene (1.5 x 1.0 mm) at 0.25 and 0.5 µm/px; ``small=False`` doubles each side.
    """
    root = Path(folder)
    good, nometa, broken = root / "slides", root / "nometa", root / "broken"
    for d in (good, nometa, broken):
        d.mkdir(parents=True, exist_ok=True)
    k = 1 if small else 2
    scene = random_scene(1500.0 * k, 1000.0 * k, seed=1, border=True)
    out: dict[str, FixtureSlide] = {}

    def add(name: str, path: Path, kind: str, mpp: float | None, mag: float | None, sc: Scene | None,
            has_mpp: bool = True, **extra: object) -> None:
        truth = save_truth(path.with_name(path.stem + ".truth.npz"), sc, mpp) if sc is not None and mpp else None
        out[name] = FixtureSlide(path, kind, mpp, mag, truth, has_mpp, dict(extra))

    add("svs40", make_svs(good / "svs40.svs", scene, 0.25, 40), "svs", 0.25, 40, scene)
    add("svs20", make_svs(good / "svs20.svs", scene, 0.5, 20, levels=(1, 4)), "svs", 0.5, 20, scene)
    glass = random_scene(1000.0 * k, 750.0 * k, seed=2, tissue=False)
    add("glass_only", make_svs(good / "glass_only.svs", glass, 0.5, 20, levels=(1, 4)), "svs", 0.5, 20, glass)
    add("tiff_nometa", make_tiff(nometa / "tiff_nometa.tiff", scene, 0.5), "tiff", 0.5, None, scene, False)
    png_scene = random_scene(600.0, 450.0, seed=4, n_blobs=2)
    add("png_small", make_png(nometa / "png_small.png", png_scene, 0.5), "png", 0.5, None, png_scene, False)
    add("broken_empty", make_empty(broken / "empty.svs"), "broken", None, None, None, reason="empty")
    add("broken_text", make_text_as_svs(broken / "text.svs"), "broken", None, None, None, reason="not a slide")
    add("broken_truncated", make_truncated_svs(broken / "truncated.svs", random_scene(500.0, 400.0, seed=5)),
        "broken", None, None, None, reason="truncated")
    cpath, box = make_corrupt_tile_tiff(broken / "corrupt_tile.tiff", random_scene(800.0, 600.0, seed=6, n_blobs=2))
    add("broken_corrupt_tile", cpath, "broken", 0.5, None, None, False, reason="corrupt tile", corrupt_tile=box)
    return out


def make_demo(path: str | os.PathLike) -> Path:
    """The committed demo slide: a 40x Aperio SVS (~2.2 x 1.5 mm, a few MB) with tissue, holes and pen marks."""
    scene = random_scene(2200.0, 1500.0, seed=11, n_blobs=5, border=False)
    return make_svs(path, scene, mpp=0.25, magnification=40, levels=(1, 4, 16), quality=70)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mstar_extract.testing.fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--demo", action="store_true", help="write only OUTDIR/demo.svs (the committed example slide)")
    parser.add_argument("--large", action="store_true", help="also write OUTDIR/large.svs (30000x20000, streamed)")
    parser.add_argument("--full", action="store_true", help="bigger fixture set (small=False)")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.demo:
        p = make_demo(args.outdir / "demo.svs")
        print(f"{p} {p.stat().st_size / 1e6:.1f} MB")
    else:
        for name, fx in build_fixture_set(args.outdir, small=not args.full).items():
            print(f"{name:22s} {fx.path}")
    if args.large:
        p = make_large_svs(args.outdir / "large.svs")
        print(f"{p} {p.stat().st_size / 1e6:.1f} MB")
    print(f"built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
