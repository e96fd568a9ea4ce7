"""``mstar report``: one HTML view of a whole run (``OUT/report.html`` + ``OUT/report_assets/``).

Self-contained (no server, no network: opens from a shared file system in any browser) and incremental (a
rebuild renders only the slides whose outputs changed). See docs/report.md.

>>> from mstar_extract.report import build_report
>>> build_report("out/").path
PosixPath('out/report.html')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_report", "ReportResult"]

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.report.build import ReportResult, build_report


def __getattr__(name: str) -> Any:  # lazy: importing the package costs nothing until a report is built
    if name in __all__:
        from mstar_extract.report import build

        return getattr(build, name)
    raise AttributeError(name)
