"""Shared pieces of the command line: the lazy group, output options, and the error → exit-code boundary."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mstar_extract.console import DEBUG, NORMAL, QUIET, Reporter, setup_logging, silence_stdout
from mstar_extract.errors import EXIT_FAILED, EXIT_RUN, EXIT_USAGE, MstarError, RunError, UsageError, first_line

F = TypeVar("F", bound=Callable[..., Any])


class MstarGroup(click.Group):
    """A click group whose subcommands are imported on first use (keeps ``mstar --help`` fast)."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, tuple[str, str, str]] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_subcommands) + sorted(c for c in super().list_commands(ctx) if c not in self.lazy_subcommands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_subcommands:
            module, attr, _ = self.lazy_subcommands[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, spec[2]) for name, spec in self.lazy_subcommands.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def output_options(jsonl: bool = True) -> Callable[[F], F]:
    """Add ``--quiet``, ``-v``, ``--debug`` (and ``--jsonl``) to a subcommand; it receives ``reporter``."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, quiet: bool, verbose: int, debug: bool, **kw: Any) -> Any:
            level = DEBUG if debug else (QUIET if quiet else min(NORMAL + verbose, DEBUG))
            setup_logging(level)
            reporter = Reporter(verbosity=level, jsonl=bool(kw.pop("jsonl", False)))
            return run_guarded(reporter, func, *args, reporter=reporter, **kw)

        wrapper = click.option("--debug", is_flag=True, help="Show debug logs and full tracebacks.")(wrapper)
        wrapper = click.option("-v", "--verbose", count=True, help="More log lines on stderr (-v info, -vv debug).")(wrapper)
        wrapper = click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr; no progress.")(wrapper)
        if jsonl:
            wrapper = click.option(
                "--jsonl", is_flag=True, help="One JSON object per line on stdout per event (see README, 'JSONL events')."
            )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def run_guarded(reporter: Reporter, func: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
    """Call a command body; turn expected errors into one stderr line and an exit code (:mod:`mstar_extract.errors`)."""
    try:
        code = func(*args, **kw)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except UsageError as exc:
        reporter.error(str(exc), exc)
        sys.exit(EXIT_USAGE)
    except RunError as exc:  # a whole-run error (mstar_extract.errors.RunError)
        reporter.error(str(exc), exc)
        sys.exit(EXIT_RUN)
    except MstarError as exc:
        reporter.error(str(exc), exc)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)  # mstar_extract.locks.Terminated carries the signal (SIGTERM)
        reporter.error("terminated" if signum else "interrupted")
        sys.exit(128 + int(signum) if signum else 130)
    except BrokenPipeError:  # stdout closed under a command that printed without Reporter.write_stdout
        silence_stdout()
        reporter.error("stdout was closed (broken pipe) before the output was written")
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        reporter.error(f"unexpected {first_line(exc, with_type=True)} (rerun with --debug for the traceback)", exc)
        sys.exit(EXIT_FAILED)
    sys.exit(int(code or 0))


def env_default(name: str, fallback: Any = None) -> Any:
    """Value of environment variable ``name`` (an empty string counts as unset), else ``fallback``."""
    value = os.environ.get(name)
    return value if value not in (None, "") else fallback


def emit_result(doc: dict[str, Any], as_json: bool, reporter: Reporter, line: str, event: str = "bench") -> None:
    """Print a command's one result: a JSONL event (``--jsonl``), one JSON document (``--json``), or ``line``."""
    import json

    if reporter.jsonl:
        reporter.event(event, **doc)
    elif as_json:
        reporter.write_stdout(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        reporter.write_stdout(line + "\n")
