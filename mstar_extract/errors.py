"""Exceptions that carry one clear, user-facing line, the exit codes of the command line, and the one helper
that turns any exception into such a line (:func:`first_line`). Exit codes are documented in the README."""

from __future__ import annotations

EXIT_OK = 0
"""Every slide ended done, skipped or no_tissue."""
EXIT_FAILED = 1
"""At least one slide failed (reported after every other slide was processed)."""
EXIT_USAGE = 2
"""Bad command line or configuration; no work was done."""
EXIT_RUN = 3
"""A whole-run error stopped the run early (OUT full or read-only, the GPU out of memory at the chosen batch
size, a failed compile, a sticky CUDA error): the slides not yet finished are left untouched for the next job."""
EXIT_INCOMPLETE = 4
"""No slide failed, but slides of the list were held by other live processes (their locks) and were still not
finished when this run ended, after waiting for them (``mstar_extract.pipeline.runner``): they are not done yet;
``mstar status OUT`` tells when they are, a rerun does what is left."""


def worst_exit_code(codes: list[int | None]) -> int:
    """One exit code for several processes of one run (``--devices``): a whole-run error (3) before a failed slide
    (1), before slides left to other processes (4), before 0; a process killed by a signal (negative or None)
    counts as 1."""
    rank = {EXIT_RUN: 3, EXIT_FAILED: 2, EXIT_INCOMPLETE: 1, EXIT_OK: 0}
    worst = EXIT_OK
    for code in codes:
        code = EXIT_FAILED if code is None or code < 0 else code
        if rank.get(code, 2) > rank.get(worst, 2):
            worst = code if code in rank else EXIT_FAILED
    return worst


class MstarError(Exception):
    """Base class of expected errors: ``str(err)`` is one line that a user can act on (no traceback)."""


class UsageError(MstarError):
    """The command line or a configuration file is wrong; the run stops before any work (exit 2)."""


class RunError(MstarError):
    """A machine- or folder-wide problem that ends the whole run (exit 3), not one slide: out of disk space,
    a read-only OUT, GPU out of memory at the configured batch size, a failed compile, a CUDA error."""


class SlideError(MstarError):
    """A per-slide problem (unreadable, unsupported, no resolution, corrupt tile ...).

    The run records it in the manifest and goes on with the other slides.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideOpenError(SlideError):
    """The file does not exist, is empty, truncated, corrupt, or no backend can read it."""


class ResolutionError(SlideError):
    """The slide has no usable resolution (mpp) metadata and none was given."""


class ReadError(SlideError):
    """Pixels could not be decoded (a corrupt tile); the reason names the level-0 coordinate."""


class WeightsError(MstarError):
    """Model weights could not be found, fetched, verified or loaded."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of ``str(exc)`` (the exception's type name when the message is empty).

    ``with_type=True`` prefixes ``TypeName: `` (for unexpected exceptions, whose type is part of the story).
    Never raises, whatever the message (empty, only whitespace, many lines)."""
    line = _first_nonempty_line(str(exc))
    name = type(exc).__name__
    if line is None:
        return name
    return f"{name}: {line}" if with_type else line


def _first_nonempty_line(text: str) -> str | None:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), None)


def reason_of(exc: BaseException) -> str:
    """The one-line reason recorded for a slide that ``exc`` ended (manifest ``error`` column, stderr line).

    A :class:`SlideError` gives its reason (the path is already in the row), any other :class:`MstarError` its
    first line, a :class:`MemoryError` ``out of memory``, anything else ``unexpected TypeName: first line``."""
    if isinstance(exc, SlideError):
        return _first_nonempty_line(str(exc.reason)) or type(exc).__name__
    if isinstance(exc, MstarError):
        return first_line(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return "unexpected " + first_line(exc, with_type=True)
