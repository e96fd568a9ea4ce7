"""Per-slide orchestration shared by ``mstar tile`` and ``mstar extract``.

* :mod:`~mstar_extract.pipeline.runner` — :class:`SlideRunner` (events, manifest rows, progress, exit code) and
  :class:`SlideOutcome`; it does not own the execution loop, so each command drives its own.
* :mod:`~mstar_extract.pipeline.tile_job` — one slide's segmentation + tiling (:func:`tile_slide`), the
  ``mstar tile`` loop over a process pool (:func:`run_tile`), and what every run does to OUT before its first
  slide (:func:`prepare_out`).
* :mod:`~mstar_extract.pipeline.extract_job` — ``mstar extract``: :func:`run_extract` and the steps of an
  :class:`ExtractRun` (planner thread, reader processes, model, bags).
* :mod:`~mstar_extract.pipeline.launch` — one process, one per GPU (``--devices``) or one torchrun rank.
* :mod:`~mstar_extract.pipeline.record` — the settings recorded in ``OUT/mstar_settings.json``.

The whole flow, function by function: docs/architecture.md.
"""

from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner

__all__ = ["SlideOutcome", "SlideRunner"]
