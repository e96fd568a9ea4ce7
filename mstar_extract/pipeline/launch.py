"""How ``mstar extract`` runs: one process, one process per GPU (``--devices``), or one torchrun rank.

* ``--devices 0,1,2,3``: the slide list is split between the devices with the same stable rule as torchrun
  ranks (:func:`mstar_extract.sharding.device_share`); one extraction process per device, each with its own
  reader workers. Weights are resolved once, in the parent, before any process starts.
* under ``torchrun --nproc_per_node=K``: each rank already took its share in ``select_slides``
  (:func:`mstar_extract.sharding.work_share`); ``--device auto``/``cuda`` becomes ``cuda:LOCAL_RANK``; the
  default reader workers are the node's CPUs divided by ``LOCAL_WORLD_SIZE``
  (:func:`mstar_extract.envdefaults.default_workers`).

Every extraction process sets its own CUDA device once (:func:`bind_device`), so nothing lands on cuda:0.

Exit codes. torchrun stops every rank as soon as one rank exits non-zero, so a rank whose only problems were
per-slide failures (recorded in the manifest) exits **0**, and the other ranks go on; ``mstar status OUT``
reports the failures and exits 1. With ``--on-error fail`` a failure still exits 1 (stopping the job is what
was asked), and a whole-run error exits 3 (that rank's node cannot go on; torchrun stops the others, which
release their locks). Outside torchrun a failed slide gives exit 1 (a single process, ``--devices``).

Per-slide locks keep every slide to one process even when these are combined with ``--shard`` and other jobs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mstar_extract.console import Reporter, setup_logging
from mstar_extract.errors import EXIT_FAILED, EXIT_OK, EXIT_RUN, MstarError, RunError, first_line, worst_exit_code
from mstar_extract.pipeline.extract_job import ExtractSettings, run_extract

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry


def _resolve_weights_once(settings: ExtractSettings) -> ExtractSettings:
    """Fetch/verify the weights in the parent so that N device processes do not download N times."""
    if settings.weights in ("random",):
        return settings
    from mstar_extract.models import get_spec, resolve_weights

    resolved = resolve_weights(get_spec(settings.model), settings.weights, cache_dir=settings.cache_dir,
                               token=settings.token)
    return replace(settings, weights=str(resolved.path)) if resolved.path is not None else settings


def bind_device(device: str) -> None:
    """Make a ``cuda``/``cuda:N`` device this process's current CUDA device (``torch.cuda.set_device``) before
    anything touches the GPU: pinned host buffers, Inductor's compiled kernels and a bare
    ``torch.cuda.synchronize()`` otherwise use cuda:0, whichever GPU the process was given. ``cpu``/``auto``:
    nothing to do here (the encoder sets the device it resolves, :meth:`mstar_extract.models.Encoder.to`)."""
    if str(device).startswith("cuda"):
        from mstar_extract.models.encoder import use_device

        use_device(device)


def _device_main(entries: list[SlideEntry], out: str, settings: ExtractSettings, verbosity: int, jsonl: bool,
                 overwrite: bool, on_error: str) -> None:  # pragma: no cover - runs in a child process
    import sys

    from mstar_extract.locks import sigterm_as_interrupt

    setup_logging(verbosity)
    reporter = Reporter(verbosity=verbosity, jsonl=jsonl)
    try:
        bind_device(settings.device)
        with sigterm_as_interrupt():  # the parent's terminate(): release this process's locks, then exit
            code = run_extract(entries, out, settings, reporter, overwrite=overwrite, on_error=on_error)
    except RunError as exc:  # a whole-run error (cli.common.run_guarded does the same)
        reporter.error(str(exc), exc)
        code = EXIT_RUN
    except MstarError as exc:
        reporter.error(str(exc), exc)
        code = EXIT_FAILED
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)
        code = 128 + int(signum) if signum else 130
    except Exception as exc:  # noqa: BLE001 - one line, as cli.common.run_guarded does, never a bare traceback
        reporter.error(f"unexpected {first_line(exc, with_type=True)} (rerun with --debug for the traceback)", exc)
        code = EXIT_FAILED
    sys.exit(code)


def launch_extract(entries: Sequence[SlideEntry], out: str | os.PathLike[str], settings: ExtractSettings, reporter: Reporter,
                   devices: list[str] | None = None, overwrite: bool = False, on_error: str = "skip") -> int:
    """Run extraction in this process, or in one child process per device; returns the exit code."""
    from mstar_extract.locks import sigterm_as_interrupt
    from mstar_extract.sharding import torchrun_rank

    info = torchrun_rank()
    failed_code = EXIT_FAILED
    if info is not None and not devices:
        import torch

        from mstar_extract.envdefaults import available_cpus, local_ranks
        from mstar_extract.sharding import rank_device

        settings = replace(settings, device=rank_device(settings.device, info, torch.cuda.is_available()))
        bind_device(settings.device)
        reporter.info(f"torchrun rank {info.rank}/{info.world_size}: {len(entries)} slide(s) on {settings.device}, "
                      f"{settings.workers} reader worker(s) ({available_cpus()} CPUs shared by {local_ranks()} "
                      f"local rank(s))")
        if on_error != "fail":  # a failed slide must not make torchrun stop the other ranks (module docstring)
            failed_code = EXIT_OK
    if not devices or len(devices) == 1:
        if devices:
            settings = replace(settings, device=devices[0])
        with sigterm_as_interrupt():
            return run_extract(entries, out, settings, reporter, overwrite=overwrite, on_error=on_error,
                               failed_code=failed_code)

    from mstar_extract.pipeline.extract_job import check_before_work
    from mstar_extract.sharding import device_share

    check_before_work(entries, out, settings, overwrite)  # a usage error here, not in every device process
    settings = _resolve_weights_once(settings)
    Path(out).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = []
    for dev, share in device_share(list(entries), devices):
        reporter.info(f"{dev}: {len(share)} slide(s)")
        p = ctx.Process(target=_device_main, name=f"mstar-extract-{dev}",
                        args=(share, str(out), replace(settings, device=dev), reporter.verbosity, reporter.jsonl,
                              overwrite, on_error))
        p.start()
        procs.append(p)
    try:
        with sigterm_as_interrupt():  # SIGTERM to this parent stops the device processes too
            for p in procs:
                p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
        raise
    from mstar_extract.manifest import merge_manifest

    merge_manifest(out)
    return worst_exit_code([p.exitcode for p in procs])
