"""Click option groups shared by ``mstar tile`` and ``mstar extract`` (README "Commands"), and the builders that
turn the parsed values into :class:`TileSettings`.

Usage::

    @click.command()
    @slide_input_options
    @resolution_options
    @segmentation_options
    @output_options()
    def tile(slides, out, reporter, **kw): ...
        settings = tile_settings_from(kw, debug=reporter.debug)   # pops the tiling/segmentation keys
        entries = select_slides(slides, kw.pop("shard"))

Every option's help shows its default. Heavy libraries are not imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mstar_extract.cli.common import env_default
from mstar_extract.errors import UsageError
from mstar_extract.store.layout import LAYOUTS

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.pipeline.tile_job import TileSettings
    from mstar_extract.tiling import TilingParams
    from mstar_extract.tissue.params import SegmentationParams

F = TypeVar("F", bound=Callable[..., Any])

BACKENDS = ("auto", "openslide", "tiffslide", "image")
COORDS_FORMATS = ("trident", "clam")
LAYOUT_NAMES = tuple(LAYOUTS)


def _apply(func: F, decorators: list[Callable[[F], F]]) -> F:
    for d in reversed(decorators):
        func = d(func)
    return func


def _need_slides_and_out(ctx: click.Context, param: click.Parameter, out: str | None) -> str:
    """OUT's callback. Click fills the last argument first, so a forgotten OUT would read as a missing SLIDES
    (``mstar extract slides/``); say what is missing instead, with the usage line (exit 2)."""
    slides = ctx.params.get("slides") or ()
    if out is None:
        raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "slides"),
                                     message="Give the slides and the output folder: SLIDES... OUT.")
    if not slides:
        raise click.MissingParameter(ctx=ctx, param=param, message=f"{out!r} was taken as SLIDES; add the output folder.")
    return out


def slide_input_options(func: F) -> F:
    """SLIDES... OUT, --backend, --mpp-override, --workers, --shard, --on-error, --overwrite."""
    return _apply(func, [
        # both optional for click, checked by OUT's callback (which names the missing one)
        click.argument("slides", nargs=-1, required=False, metavar="SLIDES..."),
        click.argument("out", type=click.Path(file_okay=False), metavar="OUT", required=False,
                       callback=_need_slides_and_out),
        click.option("--backend", type=click.Choice(BACKENDS), default=lambda: env_default("MSTAR_BACKEND", "auto"),
                     show_default="auto, or $MSTAR_BACKEND",
                     help="Slide reader. auto chooses per file (docs/backends.md): OpenSlide or tiffslide for "
                          "TIFF-based formats, OpenSlide for the others, the plain-image reader for PNG/JPEG."),
        click.option("--mpp-override", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Level-0 µm/px for slides whose files have no resolution metadata (a "
                          "list's 'mpp' column sets it per slide and always wins). [default: none]"),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="Worker processes (tile: slides segmented in parallel; extract: patch readers, 0 = read in "
                          "the main process). [default: $MSTAR_WORKERS, else CPUs - 1, at most 16]"),
        click.option("--shard", default=None, metavar="I/N|auto",
                     help="Process only share I of N of the slides (stable hash of the slide id); "
                          "'auto' reads the SLURM array variables. [default: all]"),
        click.option("--on-error", type=click.Choice(("skip", "fail")), default="skip", show_default=True,
                     help="skip: a failed slide is recorded and the others go on; "
                          "fail: stop after the first failure. Exit code 1 either way."),
        click.option("--overwrite", is_flag=True, default=False,
                     help="Redo slides whose outputs are already complete (default: skip them)."),
        *pixel_limit_options(),
    ])


def _pixel_limit(flag: str, env: str, default: str, help_text: str) -> Callable[[F], F]:
    """An option that validates a pixel count (or its variable) and exports it to the run's worker processes."""

    def store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        from mstar_extract.slides import limits

        try:
            n = limits.parse_pixels(value, "") if value is not None else limits.parse_pixels(env_default(env, default), env)
        except UsageError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        limits.export(env, n)

    return click.option(flag, default=None, metavar="PIXELS", expose_value=False, callback=store,
                        help=f"{help_text} Accepts 250M, 2G, ... [default: {default}, or ${env}]")


def pixel_limit_options() -> list[Callable[[F], F]]:
    """--max-image-pixels, --max-read-pixels (:mod:`mstar_extract.slides.limits`): refuse image bombs at once."""
    return [
        _pixel_limit("--max-image-pixels", "MSTAR_MAX_IMAGE_PIXELS", "250M",
                     "Refuse plain images (PNG, JPEG, flat TIFF) with more pixels, from their header: they are decoded "
                     "whole into memory (about 7 bytes per pixel)."),
        _pixel_limit("--max-read-pixels", "MSTAR_MAX_READ_PIXELS", "2G",
                     "Refuse a slide when segmenting it would decode more pixels of one level (a slide without a "
                     "pyramid): bounds the time one slide's segmentation can take."),
    ]


def lock_timeout_option(func: F) -> F:
    """--lock-timeout (tile and extract)."""
    return click.option(
        "--lock-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
        help="Seconds without a heartbeat after which another job's slide lock counts as stale (taken over); also "
             "the longest wait, at the end, for slides that other jobs hold. "
             "[default: $MSTAR_LOCK_TIMEOUT, else 600]")(func)


def resolution_options(func: F) -> F:
    """--magnification/--mpp, --patch-size, --overlap, --min-tissue, --exact-mpp, --snap-tolerance, --coords-format,
    --layout."""
    from mstar_extract.tiling import DEFAULT_MIN_TISSUE

    return _apply(func, [
        click.option("--magnification", "magnification", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Target objective magnification (mpp = 10 / magnification). [default: 20, i.e. 0.5 µm/px]"),
        click.option("--mpp", "target_mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Target resolution in µm/px (instead of --magnification). [default: 0.5]"),
        click.option("--patch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Patch side in pixels at the target resolution."),
        click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Overlap of neighbouring patches in pixels at the target resolution."),
        click.option("--min-tissue", type=click.FloatRange(0.0, 1.0), default=DEFAULT_MIN_TISSUE, show_default=True,
                     help="Keep a patch when at least this fraction of it lies "
                          "on tissue (patches centred in a hole are never kept)."),
        click.option("--exact-mpp", is_flag=True, default=False,
                     help="Scale by the exact mpp ratio instead of snapping "
                          "level 0 to its nominal objective (0.2527 µm/px -> 40x)."),
        click.option("--snap-tolerance", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True,
                     help="Relative tolerance for snapping level 0's magnification (10 / mpp) to a nominal objective."),
        click.option("--coords-format", type=click.Choice(COORDS_FORMATS), default=None,
                     help="coords/<id>.h5 attributes: TRIDENT's (patch_size at target, patch_size_level0, ...) "
                          "or CLAM's (patch_level, patch_size at that level). --layout clam/trident fix it. [default: "
                          "the layout's; trident for mstar]"),
        click.option("--layout", type=click.Choice(LAYOUT_NAMES), default="mstar", show_default=True,
                     help="Where files go in OUT (docs/layouts.md): mstar (features/, coords/, ...); clam (patches/, h5_files/, "
                          "pt_files/: CLAM's and the mSTAR repo's scripts read OUT as is); trident (TRIDENT's job folder: "
                          "<mag>x_<ps>px_<overlap>px_overlap/patches/, .../features_<model>/). One OUT keeps one layout."),
    ])


def _seg_option(name: str, default: Any, help_text: str, ftype: Any) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    if ftype in (bool, "bool"):
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", f"seg_{name}", default=default, show_default=True,
                            help=help_text)
    py = {"int": int, "float": float, "str": str}.get(ftype if isinstance(ftype, str) else ftype.__name__, str)
    return click.option(flag, f"seg_{name}", type=py, default=default, show_default=True, help=help_text)


def segmentation_options(func: F) -> F:
    """One option per :class:`SegmentationParams` field, plus --tissue-mask and --qc/--no-qc."""
    from mstar_extract.tissue.params import SegmentationParams

    decorators: list[Callable[[F], F]] = []
    for f in fields(SegmentationParams):
        decorators.append(_seg_option(f.name, f.default, f.metadata.get("help", ""), f.type))
    decorators.append(click.option(
        "--tissue-mask", type=click.Path(exists=True), default=None,
        help="Use this tissue outline instead of segmenting: a GeoJSON (QuPath/TRIDENT, level-0 pixels) "
             "or a mask image, or a folder of <slide_id>.geojson/.png files. [default: segment]"))
    decorators.append(click.option("--qc/--no-qc", "qc", default=True, show_default=True,
                                   help="Write qc/<slide_id>.jpg (contours, holes, pen, patch grid)."))
    return _apply(func, decorators)


def segmentation_params_from(kw: dict[str, Any]) -> SegmentationParams:
    """Pop the ``seg_*`` values from ``kw`` into a SegmentationParams (UsageError when invalid)."""
    from mstar_extract.tissue.params import SegmentationParams

    values = {k[4:]: kw.pop(k) for k in list(kw) if k.startswith("seg_")}
    try:
        return SegmentationParams(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"segmentation options: {exc}") from None


def tiling_params_from(kw: dict[str, Any]) -> TilingParams:
    """Pop the resolution/tiling values from ``kw`` into a TilingParams (UsageError when invalid)."""
    from mstar_extract.tiling import TilingParams

    mag, mpp = kw.pop("magnification", None), kw.pop("target_mpp", None)
    if mag is not None and mpp is not None:
        raise UsageError("give --magnification or --mpp, not both")
    try:
        return TilingParams(
            magnification=mag if mag is not None else (None if mpp is not None else 20.0), mpp=mpp,
            patch_size=kw.pop("patch_size", 256), overlap=kw.pop("overlap", 0), min_tissue=kw.pop("min_tissue"),
            exact_mpp=kw.pop("exact_mpp", False), snap_tolerance=kw.pop("snap_tolerance", 0.2),
        )
    except ValueError as exc:
        raise UsageError(f"tiling options: {exc}") from None


def tile_settings_from(kw: dict[str, Any], debug: bool = False) -> TileSettings:
    """Pop everything that :class:`~mstar_extract.pipeline.tile_job.TileSettings` needs from ``kw``."""
    from mstar_extract.pipeline.tile_job import TileSettings

    seg = segmentation_params_from(kw)
    tiling = tiling_params_from(kw)
    return TileSettings(
        segmentation=seg, tiling=tiling, backend=kw.pop("backend", "auto"), mpp_override=kw.pop("mpp_override", None),
        tissue_mask=kw.pop("tissue_mask", None), coords_format=kw.pop("coords_format", None),
        qc=kw.pop("qc", True), debug=debug, layout=kw.pop("layout", "mstar"),
    )


def select_slides(slides: tuple[str, ...], shard: str | None) -> list[SlideEntry]:
    """Resolve SLIDES (``-`` reads stdin) and take this job's ``--shard`` share (and torchrun rank's part)."""
    import sys

    from mstar_extract.inputs import resolve_slides
    from mstar_extract.sharding import parse_shard, work_share

    entries = resolve_slides(list(slides), stdin=sys.stdin if "-" in slides else None)
    return work_share(entries, parse_shard(shard))


def fast_decode_option() -> Callable[[F], F]:
    """``--fast-decode``: reduced-size JPEG decoding instead of the reference's exact pixels (docs/reader.md)."""
    return click.option(
        "--fast-decode", is_flag=True, default=False,
        help="Decode JPEG tiles at reduced size (1/2, 1/4 or 1/8 when the patch is downscaled that much) and snap "
             "off-grid corners: faster reading, but the model input is no longer bit-identical to the official mSTAR "
             "pipeline (measured deviation in docs/reader.md). Bags record decode=reduced. [default: exact, decode=full]")


NATIVE_MPP = 0.5
"""mSTAR (and UNI, its stage-1 teacher) were trained on 20x (0.5 µm/px) patches."""


def native_resolution_warning(tiling: Any, model: str = "mstar") -> str | None:
    """One line when the run's target resolution is not mSTAR's native 20x / 0.5 µm/px, else None."""
    mpp, mag = tiling.target()
    if abs(mpp - NATIVE_MPP) <= 1e-3 * NATIVE_MPP:
        return None
    return (f"target {mag:g}x ({mpp:g} µm/px) is not the resolution {model} was trained on (20x, 0.5 µm/px); "
            "features at other resolutions are allowed but differ from the published ones")


def model_options(weights_default: str | None = None, weights_help: str | None = None) -> Callable[[F], F]:
    """--model, --weights, --device, --batch-size, --precision, --compile/--no-compile (extract and bench)."""
    weights_help = weights_help or (
        "hf: the Hugging Face hub (gated; HF_TOKEN or a saved login; cached); PATH: a local .pth/.bin/.safetensors "
        "state dict; random: random weights, smoke tests only. [default: $MSTAR_WEIGHTS, else hf]")

    def decorate(func: F) -> F:
        return _apply(func, [
            click.option("--model", default="mstar", show_default=True, metavar="NAME",
                         help="Encoder: mstar (ViT-L/16, 1024-d), uni (MahmoodLab/UNI), or timm:<name> for any timm model."),
            click.option("--weights", default=weights_default, show_default=weights_default is not None,
                         metavar="hf|random|PATH", help=weights_help),
            click.option("--device", default=None, metavar="auto|cuda|cuda:N|cpu",
                         help="Where the model runs. [default: $MSTAR_DEVICE, else auto = cuda if available]"),
            click.option("--batch-size", type=click.IntRange(min=1), default=None,
                         help="Patches per forward pass. [default: 256 on GPU, 32 on CPU]"),
            click.option("--precision", type=click.Choice(("bf16", "fp16", "fp32")), default=None,
                         help="Autocast precision of the model. [default: bf16 on a GPU with bf16 hardware "
                              "(compute capability >= 8.0), fp16 on older GPUs (V100, T4), fp32 on CPU]"),
            click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the model."),
        ])

    return decorate


def slide_encoder_option(func: F) -> F:
    """``--slide-encoder PATH`` of ``extract``: a slide embedding right after each bag (docs/downstream.md)."""
    return click.option(
        "--slide-encoder", type=click.Path(dir_okay=False), default=None, metavar="PATH",
        help="Stage-1 aggregator (teacher.pt or aggregator_mstar.pth): also write OUT/slide_features/<slide_id>.h5 "
             "for each bag, as `mstar embed-slides` does. [default: none]")(func)
