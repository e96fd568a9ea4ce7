"""``mstar embed-slides BAGS... OUT --aggregator PATH`` — one slide embedding per bag (docs/downstream.md)."""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import output_options


@click.command(context_settings={"max_content_width": 110})
@click.argument("bags", nargs=-1, required=True, metavar="BAGS...")
@click.argument("out", type=click.Path(file_okay=False), metavar="OUT")
@click.option("--aggregator", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="The stage-1 aggregator: teacher.pt or aggregator_mstar.pth of `mstar pretrain --stage 1`.")
@click.option("--device", default=None, metavar="auto|cuda|cuda:N|cpu",
              help="Where the aggregator runs. [default: $MSTAR_DEVICE, else auto = cuda if available]")
@click.option("--on-error", type=click.Choice(("skip", "fail")), default="skip", show_default=True,
              help="skip: a failed slide is recorded and the others go on; fail: stop after the first failure.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Embed again slides whose embedding is current, or was made by another aggregator.")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds without a heartbeat after which another job's slide "
                   "lock counts as stale. [default: $MSTAR_LOCK_TIMEOUT, else 600]")
@output_options()
def embed_slides(bags: tuple[str, ...], out: str, aggregator: str, device: str | None, on_error: str, overwrite: bool,
                 lock_timeout: float | None, reporter: Any) -> int:
    """Embed every slide with the stage-1 aggregator: OUT/slide_features/<slide_id>.h5, plus the table
    OUT/slide_features.h5 and OUT/slide_features.csv.

    BAGS are feature bags (.h5), folders of bags (an `mstar extract` OUT means its features/), or glob patterns.
    Each slide is embedded from all of its patches (no sampling). A bag from another patch extractor than the
    one the aggregator was trained on fails with the reason. Current embeddings are skipped; several jobs may
    share OUT (per-slide locks; manifest in OUT/slide_features/manifest.csv).
    Exit code 0 when every slide is done/skipped/no-tissue, 1 if any failed, 2 for usage errors.

    \b
    Examples:
      mstar embed-slides out/features out/ --aggregator runs/stage1/teacher.pt
      mstar embed-slides 'out/features/TCGA-*.h5' emb/ --aggregator aggregator_mstar.pth --device cuda
    """
    from mstar_extract.downstream.embed import EmbedSettings, run_embed_slides
    from mstar_extract.downstream.inputs import resolve_bags
    from mstar_extract.envdefaults import default_device, default_lock_timeout

    entries = resolve_bags(bags)
    settings = EmbedSettings(aggregator=aggregator, device=default_device(device), overwrite=overwrite,
                             on_error=on_error, lock_timeout=default_lock_timeout(lock_timeout), debug=reporter.debug)
    return run_embed_slides(entries, out, settings, reporter)
