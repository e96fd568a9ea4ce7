"""Everything the user sees: logging levels, one-line errors, JSONL events on stdout, progress on stderr.

Rules (README "Shell pipelines, JSONL events and exit codes", issue 8):

* stdout carries only machine output (``--json`` documents or ``--jsonl`` events); everything human —
  progress bars, log lines, errors — goes to stderr.
* an expected error is one line ``mstar: <file>: <reason>``; a traceback only with ``--debug``.
* without a terminal on stderr, progress bars become one periodic log line every ``interval`` seconds
  (``MSTAR_PROGRESS_INTERVAL``, default 30) instead of carriage-return spam.
* a closed stdout (``mstar extract ... --jsonl | head -1``) never stops the work: :meth:`Reporter.write_stdout`
  catches the broken pipe, points file descriptor 1 at ``/dev/null`` (so nothing, not even Python's flush at
  exit, writes to the dead pipe again; the Python documentation's recipe for SIGPIPE) and drops the machine
  output from then on; a run says so in one stderr line and goes on to its normal exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger("mstar")

QUIET, NORMAL, VERBOSE, DEBUG = -1, 0, 1, 2


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (not the one of the moment it was made):
    a caller that swaps ``sys.stderr`` (a test's capture, a CLI runner) still gets the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbosity: int) -> None:
    """Configure the ``mstar`` logger on stderr: quiet=errors only, normal=warnings, -v=info, --debug=debug."""
    level = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("mstar")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("mstar: %(levelname)s: %(message)s" if verbosity >= DEBUG else "mstar: %(message)s"))
    root.addHandler(handler)
    root.propagate = False


def silence_stdout(stream: IO[str] | None = None) -> None:
    """Point ``stream``'s file descriptor (default: ``sys.stdout``'s) at ``/dev/null`` after its reader went away,
    so that later writes and the interpreter's flush at exit succeed quietly instead of raising BrokenPipeError
    (the recipe of the Python documentation, "Note on SIGPIPE"). Streams without a descriptor are left alone."""
    stream = sys.stdout if stream is None else stream
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


@dataclass
class Reporter:
    """One per command invocation; passed down to the pipeline so that all output goes through one place."""

    verbosity: int = NORMAL
    jsonl: bool = False
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)

    stdout_closed: bool = False
    """True once the reader of stdout went away (broken pipe): machine output is dropped from then on."""
    note_closed_stdout: bool = True
    """Say in one stderr line that events stop when stdout closes (a run; not a report that ``| head`` cut)."""

    @property
    def debug(self) -> bool:
        return self.verbosity >= DEBUG

    @property
    def quiet(self) -> bool:
        return self.verbosity <= QUIET

    def event(self, event: str, **fields: Any) -> None:
        """Write one JSONL event (``{"event": ..., **fields}``) to stdout when ``--jsonl`` is on."""
        if not self.jsonl or self.stdout_closed:
            return
        record = {"event": event, **fields}
        self.write_stdout(json.dumps(_jsonable(record), sort_keys=False) + "\n", announce=self.note_closed_stdout)

    def write_stdout(self, text: str, announce: bool = False) -> bool:
        """Write machine output to stdout and flush it; False once the reader has closed stdout (never raises
        for that). ``announce``: say so in one stderr line (a run that goes on: its events stop there)."""
        if self.stdout_closed:
            return False
        try:
            self.stdout.write(text)
            self.stdout.flush()
            return True
        except (BrokenPipeError, ValueError):  # ValueError: the stream object itself was closed
            self.stdout_closed = True
            silence_stdout(self.stdout)
            if announce:
                self.warn("stdout was closed (broken pipe): no more events on stdout; the run goes on "
                          "(every outcome is in OUT/manifest.csv)")
            return False

    def error(self, message: str, exc: BaseException | None = None) -> None:
        """One line on stderr (always shown, even with ``--quiet``); the traceback only with ``--debug``."""
        if exc is not None and self.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=self.stderr)
        self.stderr.write(f"mstar: error: {message}\n")
        self.stderr.flush()

    def info(self, message: str) -> None:
        """A human line on stderr unless ``--quiet``."""
        if not self.quiet:
            self.stderr.write(f"mstar: {message}\n")
            self.stderr.flush()

    def warn(self, message: str) -> None:
        """A warning line on stderr unless ``--quiet`` (which shows errors only)."""
        if not self.quiet:
            self.stderr.write(f"mstar: warning: {message}\n")
            self.stderr.flush()

    @contextmanager
    def progress(self, total: int | None, desc: str, unit: str = "it", position: int = 0) -> Iterator[Progress]:
        """A progress bar (tqdm on a terminal) or periodic log lines (stderr is a file or pipe).

        ``position`` stacks several bars on a terminal (0 = the top one)."""
        p = Progress(self, total, desc, unit, position)
        try:
            yield p
        finally:
            p.close()


def _progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MSTAR_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _terminal_columns(stream: IO[str]) -> int:
    """Width of the terminal behind ``stream``; 0 when it is a file, a pipe, or a pseudo-terminal without a size
    (some batch systems give one), where a bar would draw nothing and periodic lines are used instead."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """tqdm on a terminal; otherwise a line ``desc: n/total unit (rate/s, ETA)`` at most every interval seconds."""

    def __init__(self, reporter: Reporter, total: int | None, desc: str, unit: str, position: int = 0) -> None:
        self.reporter, self.total, self.desc, self.unit = reporter, total, desc, unit
        self.n = 0
        self.postfix = ""
        self._start = time.monotonic()
        self._last = self._start
        self._interval = _progress_interval()
        self._bar = None
        self._closed = False
        if _terminal_columns(reporter.stderr) > 0 and not reporter.quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=reporter.stderr, dynamic_ncols=True, leave=False,
                             position=position)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._log_line()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _log_line(self) -> None:
        if self.reporter.quiet:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.n / elapsed
        total = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {max(self.total - self.n, 0) / rate:.0f}s"
        extra = f", {self.postfix}" if self.postfix else ""
        self.reporter.stderr.write(f"mstar: {self.desc}: {self.n}{total} {self.unit} ({rate:.2f} {self.unit}/s{eta}{extra})\n")
        self.reporter.stderr.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n and time.monotonic() - self._start >= self._interval:
            self._log_line()
