"""The ``mstar`` command line: a thin click layer over the Python API (docs/architecture.md).

Each subcommand lives in its own module of this package; at import time those modules touch only click and
the standard library, so ``mstar --help`` answers without importing torch.
"""

from __future__ import annotations

import click

from mstar_extract import __version__
from mstar_extract.cli.common import MstarGroup

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# name -> (module, attribute, one-line help). Imported only when the subcommand runs (or for its --help).
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("mstar_extract.cli.info", "info", "Show slide metadata: size, levels, resolution, vendor."),
    "tile": ("mstar_extract.cli.tile", "tile", "Segment tissue and write patch coordinates (+ QC, manifest)."),
    "extract": ("mstar_extract.cli.extract", "extract", "Tile and extract mSTAR patch features into HDF5 bags."),
    "status": ("mstar_extract.cli.status", "status", "Summarise an output folder's manifest (counts, failures)."),
    "report": ("mstar_extract.cli.report", "report", "Write OUT/report.html: the whole run in one offline HTML page."),
    "bench": ("mstar_extract.cli.bench", "bench", "Measure reader, model and pipeline throughput (patches/s)."),
    "weights": ("mstar_extract.cli.weights", "weights", "List, download and verify model weights."),
    "pretrain": ("mstar_extract.cli.pretrain", "pretrain",
                 "Run mSTAR pretraining stage 1 or 2 (YAML config); export a zero-shot checkpoint."),
    "embed-slides": ("mstar_extract.cli.embed", "embed_slides",
                     "Embed each slide with the stage-1 aggregator (slide_features/)."),
    "zeroshot": ("mstar_extract.cli.zeroshot", "zeroshot", "Classify slides zero-shot from class prompts (mSTAR's method)."),
}


@click.group(cls=MstarGroup, lazy_subcommands=SUBCOMMANDS, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="mstar")
def main() -> None:
    """mstar — mSTAR whole-slide patch features and pretraining.

    \b
    Examples:
      mstar info slide.svs
      mstar tile slides/ out/
      mstar extract slides/ out/ --weights hf
    """
