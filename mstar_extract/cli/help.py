"""``--help`` in titled sections, the options a user needs first (``mstar extract --help``, ``mstar tile --help``).

Click lists a command's options in the order of their decorators, one flat list; ``extract`` has ~60 of them,
30 of which tune the tissue segmentation. :class:`SectionedCommand` prints them in sections instead, each in
the order its section names them; an option no section names is listed under "Other options" (so a new option
is never hidden, only unsorted until it is given a section).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

Sections = Sequence[tuple[str, Sequence[str]]]
"""``(title, parameter names)``; a name ending in ``*`` is a prefix (``seg_*``: every segmentation option)."""

MESSAGES = ("Messages", ("jsonl", "quiet", "verbose", "debug", "help"))
SEGMENTATION = ("Tissue segmentation (docs/tiling.md; the defaults suit H&E)", ("seg_*",))

EXTRACT_SECTIONS: Sections = (
    ("Model", ("model", "weights", "device", "batch_size", "precision", "compile", "devices", "fast_decode")),
    ("Output", ("layout", "dtype", "fmt", "slide_encoder", "overwrite", "on_error", "no_report")),
    ("Patches", ("magnification", "target_mpp", "patch_size", "overlap", "min_tissue", "coords_dir", "tissue_mask",
                 "exact_mpp", "snap_tolerance", "coords_format", "qc")),
    ("Slides and jobs", ("backend", "mpp_override", "skip_bad_patches", "workers", "shard", "lock_timeout",
                         "max_image_pixels", "max_read_pixels")),
    MESSAGES,
    SEGMENTATION,
)
"""``mstar extract --help``: the model first, then what is written, then the patch grid, then the rest."""

TILE_SECTIONS: Sections = (
    ("Patches", ("magnification", "target_mpp", "patch_size", "overlap", "min_tissue", "tissue_mask", "exact_mpp",
                 "snap_tolerance")),
    ("Output", ("layout", "coords_format", "qc", "overwrite", "on_error", "no_report")),
    ("Slides and jobs", ("backend", "mpp_override", "workers", "shard", "lock_timeout", "max_image_pixels",
                         "max_read_pixels")),
    MESSAGES,
    SEGMENTATION,
)
"""``mstar tile --help``: the patch grid first."""


class SectionedCommand(click.Command):
    """A click command whose options are listed in the titled ``sections`` (see the module docstring)."""

    def __init__(self, *args: Any, sections: Sections = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sections = tuple(sections)

    def _place(self, name: str) -> tuple[int, int]:
        """(section index, position in it) of a parameter; unnamed ones after every section."""
        for i, (_, names) in enumerate(self.sections):
            for j, pattern in enumerate(names):
                if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
                    return i, j
        return len(self.sections), 0

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[int, list[tuple[int, int, tuple[str, str]]]] = {}
        for order, param in enumerate(self.get_params(ctx)):
            record = param.get_help_record(ctx)
            if record is None or isinstance(param, click.Argument):  # arguments are in the usage line
                continue
            name = "help" if ctx.help_option_names and set(param.opts) & set(ctx.help_option_names) else param.name
            section, pos = self._place(name or "")
            groups.setdefault(section, []).append((pos, order, record))
        titles = [title for title, _ in self.sections] + ["Other options"]
        for section in sorted(groups):
            with formatter.section(titles[section]):
                formatter.write_dl([record for _, _, record in sorted(groups[section])])
