"""`mstar bench {read,model,extract}`: throughput in patches/s on this machine (README "mstar bench", issue 4 item 8).

``read`` times the reader alone: every model-ready 224-px uint8 patch of the given slides, tiled with the
default options (or coordinates from ``--coords-dir``); ``model`` and ``extract`` (cli/bench_pipeline.py) the
model alone and the whole pipeline; ``train`` the stage-2 training step.
"""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import emit_result, env_default, output_options
from mstar_extract.cli.options import BACKENDS, fast_decode_option, resolution_options, segmentation_options, tile_settings_from


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Measure reader, model and pipeline throughput (patches/s) on this machine."""


def _plan_jobs(slides: tuple[str, ...], coords_dir: str | None, settings: Any, reporter: Any) -> tuple[list, int]:
    """(SlideJobs, number of slides that could not be planned): tile with defaults or load --coords-dir files."""
    from mstar_extract.errors import MstarError, SlideError
    from mstar_extract.inputs import resolve_slides
    from mstar_extract.pipeline.tile_job import open_with_resolution, segment_and_plan
    from mstar_extract.reading import SlideJob
    from mstar_extract.store.coords import find_coords_file, read_coords_file

    backend = settings.backend
    jobs, failed = [], 0
    for entry in resolve_slides(slides):
        try:
            if entry.error:
                raise SlideError(entry.path, entry.error)
            with open_with_resolution(entry, settings) as slide:  # as `mstar tile`/`extract` open it
                if coords_dir:
                    f = find_coords_file(coords_dir, entry.slide_id)
                    if f is None:
                        raise SlideError(entry.path, f"no coordinates file for slide id {entry.slide_id!r} in {coords_dir}")
                    plan = read_coords_file(f, slide)
                else:
                    _, plan = segment_and_plan(slide, entry.slide_id, settings)
            jobs.append(SlideJob(entry.slide_id, str(entry.path), plan, backend))
            reporter.info(f"{entry.slide_id}: {len(plan)} patches (level {plan.level}, {plan.read_size} px reads)")
        except MstarError as exc:
            failed += 1
            reporter.error(str(exc))
    return jobs, failed


@bench.command("read")
@click.argument("slides", nargs=-1, required=True)
@click.option("--coords-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Read the patches of coordinate files here (mstar/CLAM/TRIDENT) instead of tiling.")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Reader processes (0 = read in this process).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--method", type=click.Choice(["auto", "tiles", "regions", "naive"]), default="auto", show_default=True,
              help="auto/tiles/regions: the fast reader's path; naive: one read_region per patch (baseline).")
@fast_decode_option()
@click.option("--input-size", type=click.IntRange(min=1), default=224, show_default=True, help="Model input px.")
@click.option("--backend", type=click.Choice(BACKENDS), default=lambda: env_default("MSTAR_BACKEND", "auto"),
              show_default="auto, or $MSTAR_BACKEND")
@click.option("--mpp-override", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MPP")
@resolution_options
@segmentation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@output_options()
def read(slides: tuple[str, ...], coords_dir: str | None, workers: int, batch_size: int, method: str, fast_decode: bool,
         input_size: int, as_json: bool, reporter: Any, **kw: Any) -> int:
    """Reader-only throughput: every model-ready uint8 patch of SLIDES, in patches/s."""
    from mstar_extract.errors import EXIT_FAILED, EXIT_OK
    from mstar_extract.reading.bench import bench_read

    settings = tile_settings_from(kw, debug=reporter.debug)  # the same tiling defaults as `mstar tile`
    jobs, failed = _plan_jobs(slides, coords_dir, settings, reporter)
    res = bench_read(jobs, workers=workers, batch_size=batch_size, out_size=input_size, method=method,
                     decode="reduced" if fast_decode else "full", on_slide=lambda row: reporter.event("slide", **row))
    failed += sum(1 for row in res.slides if row["error"])
    for row in res.slides:
        if row["error"]:
            reporter.error(row["error"])
    emit_result(res.to_dict(), as_json, reporter,
                f"read: {res.patches_per_s:.1f} patches/s ({res.n_patches} patches of {input_size} px in "
                f"{res.seconds:.2f} s; method {res.method}, decode {res.decode}, workers {res.workers}, batch {res.batch_size}, "
                f"{len(res.slides)} slides; worker start-up {res.startup_seconds:.2f} s not counted)")
    return EXIT_FAILED if failed else EXIT_OK


# model-only and whole-pipeline throughput live in their own module (issue 4 item 8)
from mstar_extract.cli.bench_pipeline import extract as _bench_extract, model as _bench_model  # noqa: E402

bench.add_command(_bench_model)
bench.add_command(_bench_extract)


@bench.command("train")
@click.option("--model", default="mstar", show_default=True, metavar="NAME",
              help="Student architecture from the model registry (mstar = ViT-L/16; timm:<name> for others).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Patches per step [default: 64 on CUDA, 4 on the CPU].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Timed steps [default: 20 on CUDA, 2 on the CPU].")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps first.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True)
@click.option("--ema-weight", type=float, default=0.6, show_default=True, help="lambda of the EMA term (0 = no EMA forward).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@output_options()
def train(model: str, batch_size: int | None, steps: int | None, warmup: int, device: str, precision: str,
          grad_checkpointing: bool, ema_weight: float, as_json: bool, reporter: Any) -> int:
    """Stage-2 training throughput: patches/s of the full optimisation step (student + proj + EMA, AdamW).

    Random patches already on the device, so slide reading is not included (see `mstar bench read`).
    Precision auto follows training: bf16 on GPUs with bf16 hardware, fp16 with a GradScaler on older GPUs
    (one line says so), fp32 on the CPU.
    """
    from mstar_extract.pretrain.dist import resolve_device
    from mstar_extract.pretrain.stage2.bench import bench_train

    cuda = resolve_device(device).type == "cuda"
    res = bench_train(model=model, batch_size=batch_size or (64 if cuda else 4), steps=steps or (20 if cuda else 2),
                      warmup=warmup if cuda else min(warmup, 1), device=device, precision=precision,
                      grad_checkpointing=grad_checkpointing, ema_weight=ema_weight, reporter=reporter)
    mem = f", peak {res.peak_memory_gb:.1f} GiB" if res.peak_memory_gb is not None else ""
    emit_result(res.to_dict(), as_json, reporter,
                f"train (stage 2): {res.patches_per_s:.1f} patches/s ({res.model}, batch {res.batch_size}, "
                f"{res.precision} on {res.device}, {res.steps} steps in {res.seconds:.2f} s{mem})")
    return 0
