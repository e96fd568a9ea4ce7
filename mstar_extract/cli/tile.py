"""``mstar tile SLIDES... OUT`` — tissue segmentation and patch coordinates (+ QC pictures, GeoJSON, manifest)."""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import output_options
from mstar_extract.cli.help import TILE_SECTIONS, SectionedCommand
from mstar_extract.cli.options import (
    lock_timeout_option,
    resolution_options,
    segmentation_options,
    select_slides,
    slide_input_options,
    tile_settings_from,
)
from mstar_extract.cli.report import no_report_option, report_after_run


@click.command(cls=SectionedCommand, sections=TILE_SECTIONS, context_settings={"max_content_width": 110})
@slide_input_options
@resolution_options
@segmentation_options
@lock_timeout_option
@no_report_option
@output_options()
def tile(slides: tuple[str, ...], out: str, reporter: Any, **kw: Any) -> int:
    """Segment tissue and write patch coordinates for every slide.

    SLIDES are files, folders (searched recursively), glob patterns, CSV/TXT lists, or '-' for a list on stdin.
    Writes OUT/coords/<id>.h5, OUT/qc/<id>.jpg, OUT/contours/<id>.geojson and OUT/manifest.csv
    (see docs/tiling.md; --layout clam|trident names them as CLAM or TRIDENT do: docs/layouts.md). Exit code 0 when
    every slide is done/skipped/no-tissue, 1 if any failed, 2 for usage errors, 3 for a whole-run error, 4 when slides
    held by other jobs were not done (README, "Exit codes").

    \b
    Examples:
      mstar tile slides/ out/
      mstar tile slides/ out/ --magnification 40 --patch-size 224 --min-tissue 0.25
      mstar tile slides/ out/ --layout clam          # out/patches/<id>.h5 for CLAM's/mSTAR's extractor
      find /data -name '*.svs' | mstar tile - out/ --jsonl
    """
    from mstar_extract.envdefaults import default_lock_timeout, default_workers
    from mstar_extract.pipeline.tile_job import run_tile

    settings = tile_settings_from(kw, debug=reporter.debug)
    entries = select_slides(slides, kw.pop("shard", None))
    workers = max(1, default_workers(kw.pop("workers", None)))
    code = run_tile(entries, out, settings, workers=workers, reporter=reporter, overwrite=kw.pop("overwrite", False),
                    on_error=kw.pop("on_error", "skip"), lock_timeout=default_lock_timeout(kw.pop("lock_timeout")))
    return report_after_run(out, code, reporter, kw.pop("no_report"))
