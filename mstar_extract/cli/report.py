"""``mstar report OUT``: the run in one HTML page (``OUT/report.html``), and the ``--no-report`` option with the
hook that ``extract`` and ``tile`` call when they finish (:func:`report_after_run`). See docs/report.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mstar_extract.cli.common import output_options

F = TypeVar("F", bound=Callable[..., Any])


def no_report_option(func: F) -> F:
    """``--no-report`` for ``extract`` and ``tile`` (the command receives ``no_report``)."""
    return click.option("--no-report", is_flag=True, default=False,
                        help="Do not write OUT/report.html at the end (write it later with 'mstar report OUT').")(func)


def report_after_run(out: str | Path, code: int, reporter: Any, no_report: bool) -> int:
    """Write the report at the end of ``extract``/``tile`` unless ``no_report``; returns ``code`` unchanged.

    A report problem is one warning line and never changes the run's exit code; when another job sharing OUT
    is writing the report, this one leaves it to that job."""
    if no_report:
        return code
    from mstar_extract.errors import first_line
    from mstar_extract.report.build import build_report
    from mstar_extract.report.lock import ReportBusy

    try:
        result = build_report(out)
    except ReportBusy as exc:
        reporter.info(f"report: skipped ({exc})")
        return code
    except Exception as exc:  # noqa: BLE001 - the run's outcome is already decided; the report is an extra
        reporter.warn(f"report not written: {first_line(exc)} (retry with 'mstar report {out}')")
        return code
    reporter.info(f"report: {result.path} ({_rendered(result)})")
    return code


def _rendered(result: Any) -> str:
    r = result.rendered
    return (f"{result.n_slides} slide{'s' if result.n_slides != 1 else ''}; rendered {r['pages']} pages, "
            f"{r['thumbs']} thumbnails, {r['maps']} feature maps in {result.seconds:.1f} s; PCA basis {result.basis}")


@click.command(context_settings={"max_content_width": 110})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the default web browser when written.")
@click.option("--rebuild", is_flag=True,
              help="Ignore the cache: refit the PCA basis over the current bags and render every slide again.")
@output_options(jsonl=False)
def report(out: Path, open_browser: bool, rebuild: bool, reporter: Any) -> int:
    """Write OUT/report.html: run summary, slide table, QC contact sheet and a page per slide with its feature map.

    The page needs no server or network (open it from a shared file system); a rerun renders only the slides
    whose outputs changed. extract and tile write it when they finish (unless --no-report).

    \b
    Examples:
      mstar report out/
      mstar report out/ --open
      mstar report out/ --rebuild      # refit the PCA colours over all bags, render everything
    """
    from mstar_extract.errors import UsageError
    from mstar_extract.report.build import build_report

    if not out.is_dir():
        raise UsageError(f"{out}: no such folder")
    with reporter.progress(None, "report: slides", "slide") as bar:
        result = build_report(out, rebuild=rebuild, progress=lambda i, n: bar.update(1))
    reporter.info(_rendered(result))
    click.echo(str(result.path))
    if open_browser:
        import webbrowser

        if not webbrowser.open(result.path.resolve().as_uri()):
            reporter.warn(f"no web browser found; open {result.path} yourself")
    return 0
