"""``mstar bench model`` and ``mstar bench extract`` (registered on the ``bench`` group in ``cli/bench.py``).

* ``model``: model-only patches/s — synthetic uint8 patches already on the device, through the same
  preprocessing (resize when ``--input-px`` differs from the model input, normalisation) and forward pass as
  ``mstar extract`` (:func:`mstar_extract.models.benchmark_model`).
* ``extract SLIDE...``: whole-pipeline patches/s — the real extraction (segmentation, tiling, reader workers,
  inference, bags) into a temporary OUT (or ``--out``), every slide computed
  (:func:`mstar_extract.pipeline.bench_extract.bench_extract`).

Both default to ``--weights random``: throughput does not depend on the weight values, so no download or
hub access is needed (a warning says the weights are random). Give ``--weights PATH|hf`` to time the real ones.
"""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import emit_result, env_default, output_options
from mstar_extract.cli.options import BACKENDS, model_options

_WEIGHTS_HELP = "Weights to load; throughput does not depend on their values, so random needs no download."
_JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


@click.command("model", context_settings={"help_option_names": ["-h", "--help"]})
@model_options("random", _WEIGHTS_HELP)
@_JSON
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Timed duration (after warm-up).")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Timed batches instead of --seconds.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed batches first (torch.compile compiles here).")
@click.option("--input-px", type=click.IntRange(min=1), default=None,
              help="Side of the synthetic uint8 patches; "
                   "256 includes the on-device 256->224 resize. [default: the model input size]")
@output_options()
def model(model: str, weights: str, device: str | None, batch_size: int | None, precision: str | None,
          compile: bool, as_json: bool, seconds: float, iters: int | None, warmup: int, input_px: int | None,
          reporter: Any) -> int:
    """Model-only throughput: synthetic patches on the device through preprocessing + forward, in patches/s."""
    from mstar_extract.envdefaults import default_device, default_weights
    from mstar_extract.errors import EXIT_OK, UsageError, WeightsError
    from mstar_extract.models import Encoder, benchmark_model
    from mstar_extract.pipeline.extract_job import default_batch_size

    try:
        enc = Encoder.create(model, default_weights(weights), device=default_device(device), precision=precision,
                             compile=compile)
    except WeightsError as exc:
        raise UsageError(str(exc)) from exc
    bs = batch_size or default_batch_size(enc.device.type)
    reporter.info(f"bench model: {enc.name} ({enc.weights.description}) on {enc.device}, {enc.precision}, batch {bs}"
                  f"{', compiled' if compile else ''}")
    res = benchmark_model(enc, batch_size=bs, seconds=None if iters else seconds, iters=iters, warmup=warmup,
                          input_px=input_px)
    doc = {"benchmark": "model", **res, "workers": 0, "weights": enc.weights.description}
    emit_result(doc, as_json, reporter,
          f"model: {res['patches_per_s']:.1f} patches/s ({enc.name}, {res['device_name']}, {res['precision']}, "
          f"batch {bs}, {res['input_px']} px input, {res['iters']} batches in {res['seconds']:.2f} s"
          f"{', compiled' if compile else ''}; warm-up {res['warmup_seconds']:.2f} s not counted)")
    return EXIT_OK


@click.command("extract", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True)
@model_options("random", _WEIGHTS_HELP)
@_JSON
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write the outputs here and keep them. [default: a temporary folder, deleted afterwards]")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Reader processes (0 = read in this process). [default: $MSTAR_WORKERS, else CPUs - 1]")
@click.option("--magnification", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target magnification. [default: 20]")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target µm/px (instead of --magnification).")
@click.option("--patch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Patch px at the target.")
@click.option("--backend", type=click.Choice(BACKENDS), default=lambda: env_default("MSTAR_BACKEND", "auto"),
              show_default="auto, or $MSTAR_BACKEND")
@click.option("--mpp-override", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MPP",
              help="Level-0 µm/px for slides without resolution metadata.")
@click.option("--coords-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reuse coordinates (mstar tile / CLAM / TRIDENT) instead of segmenting.")
@output_options()
def extract(slides: tuple[str, ...], model: str, weights: str, device: str | None, batch_size: int | None,
            precision: str | None, compile: bool, as_json: bool, out: str | None, workers: int | None,
            magnification: float | None, mpp: float | None, patch_size: int, backend: str,
            mpp_override: float | None, coords_dir: str | None, reporter: Any) -> int:
    """Whole-pipeline throughput of `mstar extract` on SLIDES (patches written per second; model load not counted)."""
    from mstar_extract.envdefaults import default_device, default_weights, default_workers
    from mstar_extract.errors import EXIT_FAILED, EXIT_OK, UsageError, WeightsError
    from mstar_extract.inputs import resolve_slides
    from mstar_extract.pipeline.bench_extract import bench_extract
    from mstar_extract.pipeline.extract_job import ExtractSettings
    from mstar_extract.pipeline.tile_job import TileSettings
    from mstar_extract.tiling import TilingParams

    if magnification is not None and mpp is not None:
        raise UsageError("give --magnification or --mpp, not both")
    try:
        tiling = TilingParams(magnification=magnification if magnification is not None else (None if mpp else 20.0),
                              mpp=mpp, patch_size=patch_size)
    except ValueError as exc:
        raise UsageError(f"tiling options: {exc}") from None
    settings = ExtractSettings(
        tile=TileSettings(tiling=tiling, backend=backend, mpp_override=mpp_override, debug=reporter.debug),
        model=model, weights=default_weights(weights), device=default_device(device), precision=precision,
        batch_size=batch_size, compile=compile, coords_dir=coords_dir, workers=default_workers(workers),
    )
    entries = resolve_slides(list(slides))
    try:
        res = bench_extract(entries, settings, reporter, out=out)
    except WeightsError as exc:
        raise UsageError(str(exc)) from exc
    emit_result(res, as_json, reporter,
          f"extract: {res['patches_per_s']:.1f} patches/s ({res['n_patches']} patches of {res['n_slides']} slide(s) in "
          f"{res['seconds']:.2f} s; {res['model']} on {res['device_name']}, {res['precision']}, batch {res['batch_size']}, "
          f"{res['workers']} reader worker(s); model load {res['model_load_seconds']:.2f} s not counted)")
    return EXIT_FAILED if res["exit_code"] else EXIT_OK
