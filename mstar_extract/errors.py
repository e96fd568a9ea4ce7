"""Exceptions that carry one clear, user-facing line, and the exit codes of the command line (design §3)."""

from __future__ import annotations

EXIT_OK = 0
"""Every slide ended done, skipped or no_tissue."""
EXIT_FAILED = 1
"""At least one slide failed (reported after every other slide was processed)."""
EXIT_USAGE = 2
"""Bad command line or configuration; no work was done."""


class MstarError(Exception):
    """Base class of expected errors: ``str(err)`` is one line that a user can act on (no traceback)."""


class UsageError(MstarError):
    """The command line or a configuration file is wrong; the run stops before any work (exit 2)."""


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
