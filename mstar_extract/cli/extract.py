"""``mstar extract SLIDES... OUT`` — everything ``mstar tile`` does, then mSTAR patch features per slide."""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import output_options
from mstar_extract.cli.help import EXTRACT_SECTIONS, SectionedCommand
from mstar_extract.cli.options import (
    fast_decode_option,
    lock_timeout_option,
    model_options,
    native_resolution_warning,
    resolution_options,
    segmentation_options,
    select_slides,
    slide_encoder_option,
    slide_input_options,
    tile_settings_from,
)
from mstar_extract.cli.report import no_report_option, report_after_run


def extract_options(func: Any) -> Any:
    """The model, weights, device and storage options of ``extract`` (also used by ``bench extract``)."""
    decorators = [
        model_options(),
        click.option("--devices", default=None, metavar="0,1,...",
                     help="Several GPUs on this node: one extraction process per GPU, "
                          "each with its own readers. [default: one process]"),
        click.option("--dtype", type=click.Choice(("float32", "float16")), default="float32", show_default=True,
                     help="dtype of the stored features."),
        click.option("--format", "fmt", type=click.Choice(("h5", "pt", "both")), default="h5", show_default=True,
                     help="h5: features/<id>.h5; pt or both: also pt_files/<id>.pt "
                          "(float32 (N, D) tensor for CLAM/mSTAR MIL code)."),
        click.option("--coords-dir", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Reuse patch coordinates from mstar tile (coords/), "
                          "CLAM (patches/) or TRIDENT (*_patches.h5) instead of segmenting."),
        click.option("--skip-bad-patches", is_flag=True, default=False,
                     help="Drop patches whose pixels cannot be decoded (after one retry) "
                          "and count them in the manifest, instead of failing the slide."),
        fast_decode_option(),
        lock_timeout_option,
    ]
    for d in reversed(decorators):
        func = d(func)
    return func


@click.command(cls=SectionedCommand, sections=EXTRACT_SECTIONS, context_settings={"max_content_width": 110})
@slide_input_options
@resolution_options
@segmentation_options
@extract_options
@slide_encoder_option
@no_report_option
@output_options()
def extract(slides: tuple[str, ...], out: str, reporter: Any, **kw: Any) -> int:
    """Tile every slide and write its mSTAR patch features to OUT/features/<slide_id>.h5.

    SLIDES are files, folders (searched recursively), glob patterns, CSV/TXT lists, or '-' for a list on stdin.
    Slides whose bag is already complete are skipped (use --overwrite to redo them); several jobs may share OUT.
    Exit code 0 when every slide is done/skipped/no-tissue, 1 if any failed (0 for a torchrun rank: see
    'mstar status'), 2 for usage errors or missing weights, 3 when a whole-run error stopped the run (OUT full or
    read-only, GPU out of memory at --batch-size, a CUDA error, a failed --compile), 4 when slides held by other
    jobs were not done (README, "Exit codes").

    \b
    Examples:
      mstar extract examples/slides out/                       # mSTAR weights from the hub (gated)
      mstar extract examples/slides out/ --weights random      # offline smoke test
      mstar extract slides/ out/ --weights mSTAR.pth --batch-size 512 --dtype float16
      mstar extract slides/ out/ --coords-dir clam_out/ --format both
      mstar extract slides/ out/ --fast-decode                 # faster reading, inputs not bit-exact
      mstar extract slides/ out/ --layout trident    # out/ as a TRIDENT job folder (docs/layouts.md)
      sbatch --array=0-15 ... mstar extract slides/ out/ --shard auto
    """
    from mstar_extract.envdefaults import default_device, default_lock_timeout, default_weights, default_workers
    from mstar_extract.errors import UsageError, WeightsError
    from mstar_extract.pipeline.extract_job import ExtractSettings
    from mstar_extract.pipeline.launch import launch_extract
    from mstar_extract.sharding import parse_devices

    tile = tile_settings_from(kw, debug=reporter.debug)
    devices = parse_devices(kw.pop("devices"))
    entries = select_slides(slides, kw.pop("shard", None))
    settings = ExtractSettings(
        tile=tile, model=kw.pop("model"), weights=default_weights(kw.pop("weights")),
        device=default_device(kw.pop("device")), precision=kw.pop("precision"), batch_size=kw.pop("batch_size"),
        compile=kw.pop("compile"), dtype=kw.pop("dtype"), format=kw.pop("fmt"), coords_dir=kw.pop("coords_dir"),
        skip_bad_patches=kw.pop("skip_bad_patches"),
        workers=default_workers(kw.pop("workers"), n_procs=len(devices) if devices else 1),
        lock_timeout=default_lock_timeout(kw.pop("lock_timeout")), slide_encoder=kw.pop("slide_encoder"),
        decode="reduced" if kw.pop("fast_decode") else "full",
    )
    if not settings.coords_dir:  # coordinate files bring their own resolution
        note = native_resolution_warning(tile.tiling, settings.model)
        if note:
            reporter.warn(note)
    try:
        code = launch_extract(entries, out, settings, reporter, devices=devices, overwrite=kw.pop("overwrite"),
                              on_error=kw.pop("on_error"))
    except WeightsError as exc:  # nothing was done: a set-up problem like a usage error (exit 2)
        raise UsageError(str(exc)) from exc
    return report_after_run(out, code, reporter, kw.pop("no_report"))
