"""Per-slide orchestration shared by ``mstar tile`` and ``mstar extract``.

* :mod:`~mstar_extract.pipeline.runner` — :class:`SlideRunner` (events, manifest rows, progress, exit code) and
  :class:`SlideOutcome`; it does not own the execution loop, so each command drives its own.
* :mod:`~mstar_extract.pipeline.tile_job` — one slide's segmentation + tiling (:func:`tile_slide`) and the
  ``mstar tile`` loop over a process pool (:func:`run_tile`).
"""

from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner

__all__ = ["SlideOutcome", "SlideRunner"]
