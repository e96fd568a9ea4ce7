"""Which errors end the whole run (exit 3) instead of one slide (a ``failed`` row, the run goes on).

A slide fails for reasons of its own: an unreadable file, no resolution, a corrupt tile. Some errors are not
about the slide at all, and would fail every slide after it in the same way:

* OUT cannot be written: no space left, quota exceeded, a read-only file system
  (:func:`mstar_extract.store.atomic.disk_problem`), and, when it escapes the slide loop (a lock or a manifest
  part cannot be created), a permission error;
* the device: out of memory at the chosen batch size, a CUDA error (the CUDA context is unusable afterwards), a
  ``torch.compile`` failure (:func:`mstar_extract.models.encoder.device_problem`).

Such an error stops the run with one line and exit code 3 (:data:`mstar_extract.errors.EXIT_RUN`): slides that
finished keep their bags and rows; the slide in flight and the ones not started are released without a row, so
the next job (a resubmission with more disk, a smaller ``--batch-size``, without ``--compile``) takes them.
"""

from __future__ import annotations

import errno
import sys

from mstar_extract.errors import RunError, first_line

LEFT_FOR_NEXT = "finished slides are kept, the others are left for the next run"
_PERMISSION = (errno.EACCES, errno.EPERM)


def whole_run_reason(exc: BaseException, escaped: bool = False) -> str | None:
    """One line saying why ``exc`` is not about one slide, else None.

    ``escaped``: ``exc`` came out of the run's own bookkeeping (locks, manifest, settings record), not out of one
    slide's work; a permission error on OUT counts then too."""
    if isinstance(exc, RunError):
        return str(exc)
    from mstar_extract.store.atomic import disk_problem

    reason = disk_problem(exc)
    if reason is None and escaped and isinstance(exc, OSError) and exc.errno in _PERMISSION:
        where = f" {exc.filename}" if exc.filename else ""
        reason = f"cannot write{where}: {exc.strerror or first_line(exc)}"
    if reason is None and "torch" in sys.modules:  # a device error needs torch to have been imported at all
        from mstar_extract.models.encoder import device_problem

        reason = device_problem(exc)
    return reason


def whole_run_error(exc: BaseException, escaped: bool = False) -> RunError | None:
    """The :class:`RunError` to stop the run with when ``exc`` is not about one slide (:func:`whole_run_reason`),
    else None; ``exc`` itself when it is one already."""
    if isinstance(exc, RunError):
        return exc
    reason = whole_run_reason(exc, escaped)
    return None if reason is None else RunError(f"{reason} ({LEFT_FOR_NEXT})")


def is_whole_run(exc: BaseException) -> bool:
    """Whether a slide's error must stop the whole run (:func:`whole_run_reason`)."""
    return whole_run_reason(exc) is not None
