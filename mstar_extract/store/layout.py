"""The output folder OUT: every path that mstar writes there, built in one place from a validated slide id.

Three layouts (:data:`LAYOUTS`, chosen with ``--layout``; docs/layouts.md says which folder each tool reads).
The ``mstar`` layout (the default)::

    OUT/
      features/<slide_id>.h5        feature bag (extract; written last: the slide's completion marker)
      pt_files/<slide_id>.pt        (N, D) float32 tensor, with --format pt|both
      coords/<slide_id>.h5          patch coordinates (tile and extract; tile's completion marker)
      qc/<slide_id>.jpg             QC picture
      contours/<slide_id>.geojson   tissue and pen outlines
      manifest.csv                  merged manifest (:mod:`mstar_extract.manifest`)
      mstar_settings.json           the settings OUT's outputs were made with (:mod:`mstar_extract.store.record`)
      report.html, report_assets/   the run's HTML report (:mod:`mstar_extract.report`)
      slide_features/<slide_id>.h5  one slide embedding (embed-slides, extract --slide-encoder; :mod:`mstar_extract.downstream`)
      slide_features.h5, slide_features.csv   every slide embedding of OUT in one table
      zeroshot.csv, zeroshot_metrics.json    zero-shot predictions and, with labels, accuracy (mstar zeroshot)
      .manifest/<host>-<pid>-<ns>.csv   one manifest part per process
      .locks/<slide_id>.lock        one lock per slide being processed (:mod:`mstar_extract.locks`)
      .mstar_settings.lock          held for the few milliseconds it takes to update mstar_settings.json

``clam`` (:class:`ClamLayout`: what CLAM's ``extract_features_fp.py`` / training code and the mSTAR repo's
``Feature_extract`` read): ``patches/<id>.h5`` (CLAM coordinate attributes), ``h5_files/<id>.h5`` (the bag),
``pt_files/<id>.pt`` (always written), ``masks/<id>.jpg`` (QC picture), ``contours/<id>.geojson``.

``trident`` (:class:`TridentLayout`: TRIDENT's job folder): ``thumbnails/<id>.jpg``, ``contours/<id>.jpg`` (QC
picture), ``contours_geojson/<id>.geojson``, and under ``<mag>x_<ps>px_<overlap>px_overlap/``:
``patches/<id>_patches.h5`` (TRIDENT coordinate attributes) and ``features_<model>/<id>.h5`` (the bag; ``.pt``
beside it with --format pt|both).

Run-level files (manifest, settings record, report, locks) have the same place in every layout, so ``mstar
status`` and ``mstar report`` read any OUT; they learn its layout from the settings record
(:func:`mstar_extract.store.record.recorded_layout`).

Temporary files are ``.<final name>.<host>.<pid>.<8 hex>.tmp`` beside their final file; that rule belongs to
:mod:`mstar_extract.store.atomic`, which every writer goes through.

**Slide ids.** An id names files, so it must be a plain, safe file name: :func:`slide_id_problem` lists the
rules (not empty, at most :data:`MAX_SLIDE_ID_LENGTH` characters, no ``/`` or ``\\``, no ``..``, no leading
``.``, no control characters). The slide list is checked when it is read (:mod:`mstar_extract.inputs`), and
:class:`OutLayout` checks again: every per-slide path is built from a valid id and must lie under OUT, or
:class:`~mstar_extract.errors.UsageError` is raised. "Under OUT" is decided on the normalised absolute path,
without following symbolic links, so a user may point e.g. ``OUT/features`` at another disk.

**Another layout** is a subclass of :class:`OutLayout` that overrides the per-slide file methods
(:meth:`OutLayout.bag`, :meth:`~OutLayout.coords`, ...) and is registered in :data:`LAYOUTS`; the pipeline only
ever calls :func:`make_layout`, so it needs no change. :class:`LayoutContext` carries what folder names are made of.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mstar_extract.errors import UsageError

MAX_SLIDE_ID_LENGTH = 200
"""Longest accepted slide id (file names are limited to 255 bytes; suffixes and temp names need room)."""

MANIFEST_NAME = "manifest.csv"
MANIFEST_PARTS_DIR = ".manifest"
LOCKS_DIR = ".locks"
LOCK_SUFFIX = ".lock"
SETTINGS_RECORD_NAME = "mstar_settings.json"
REPORT_NAME = "report.html"
REPORT_ASSETS_DIR = "report_assets"
SLIDE_FEATURES_DIR = "slide_features"
ZEROSHOT_NAME = "zeroshot"


# --------------------------------------------------------------------------------------------------- slide ids
def slide_id_problem(slide_id: object) -> str | None:
    """Why ``slide_id`` cannot name output files, or None when it can."""
    if not isinstance(slide_id, str) or slide_id == "":
        return "is empty"
    if len(slide_id) > MAX_SLIDE_ID_LENGTH:
        return f"is longer than {MAX_SLIDE_ID_LENGTH} characters"
    if "/" in slide_id or "\\" in slide_id:
        return "contains a path separator (/ or \\)"
    if ".." in slide_id:
        return "contains '..'"
    if slide_id.startswith("."):
        return "starts with '.' (hidden files are this tool's own)"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in slide_id):
        return "contains a control character"
    return None


def validate_slide_id(slide_id: object, where: str = "") -> str:
    """``slide_id`` when it is a safe file name, else :class:`UsageError` naming ``where`` (e.g. a list row)."""
    problem = slide_id_problem(slide_id)
    if problem is not None:
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}slide id {slide_id!r} {problem}; slide ids name output files "
                         "(give a plain name in the list's slide_id column, or rename the file)")
    return str(slide_id)


def lock_file_name(slide_id: str) -> str:
    """File name of a slide's lock (percent-encoded, so distinct ids always give distinct names)."""
    return quote(slide_id, safe=" +,-._=@~()[]") + LOCK_SUFFIX


# ------------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class LayoutContext:
    """What a layout may put into folder names besides the slide id (the ``trident`` layout uses all four)."""

    magnification: float | None = None
    """Target magnification (``20`` in TRIDENT's ``20x_256px_0px_overlap``)."""
    patch_size: int | None = None
    """Patch side in pixels at the target."""
    overlap: int | None = None
    model: str | None = None
    """The feature model (``--model``); None for ``tile``."""


@dataclass(frozen=True)
class SlidePaths:
    """Every file of one slide under OUT."""

    slide_id: str
    bag: Path
    pt: Path
    coords: Path
    qc: Path
    contours: Path
    lock: Path
    thumbnail: Path | None = None
    """A plain thumbnail, in layouts that have one (``trident``)."""


class OutLayout:
    """The ``mstar`` layout of an output folder (see the module docstring for the tree)."""

    name = "mstar"
    coords_format: str | None = None
    """The coordinate attributes this layout's readers need (``clam``/``trident``); None: ``--coords-format``."""
    always_pt = False
    """Write ``pt`` files whatever ``--format`` says (CLAM's training code reads only those)."""
    context_keys: tuple[str, ...] = ()
    """The :class:`LayoutContext` fields that name folders (recorded in OUT's settings record)."""
    geojson_pen = True
    """Add the pen outlines (class ``Pen``) to the contours GeoJSON."""

    def __init__(self, out_dir: str | os.PathLike[str], context: LayoutContext | None = None) -> None:
        self.root = Path(out_dir)
        self.context = context or LayoutContext()
        self._root_abs = Path(os.path.abspath(self.root))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def recorded(self) -> dict[str, object]:
        """What OUT's settings record keeps of this layout: its name and the context that names its folders."""
        return {"layout": self.name, **{k: getattr(self.context, k) for k in self.context_keys}}

    # -- run-level files ---------------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def manifest_parts_dir(self) -> Path:
        return self.root / MANIFEST_PARTS_DIR

    def manifest_part(self, host: str, pid: int, stamp_ns: int) -> Path:
        """One process's manifest part file."""
        return self.manifest_parts_dir / f"{host}-{int(pid)}-{int(stamp_ns)}.csv"

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS_DIR

    @property
    def settings_record(self) -> Path:
        return self.root / SETTINGS_RECORD_NAME

    @property
    def settings_lock(self) -> Path:
        return self.root / f".{SETTINGS_RECORD_NAME}{LOCK_SUFFIX}"

    @property
    def report(self) -> Path:
        """The run's HTML report (its own files live in :attr:`report_assets`; :mod:`mstar_extract.report`)."""
        return self.root / REPORT_NAME

    @property
    def report_assets(self) -> Path:
        return self.root / REPORT_ASSETS_DIR

    # -- per-slide files (override these in another layout) ---------------------------------------------------
    def bag(self, slide_id: str) -> Path:
        return self._inside("features", f"{self._id(slide_id)}.h5")

    def pt(self, slide_id: str) -> Path:
        return self._inside("pt_files", f"{self._id(slide_id)}.pt")

    def coords(self, slide_id: str) -> Path:
        return self._inside("coords", f"{self._id(slide_id)}.h5")

    def qc(self, slide_id: str) -> Path:
        return self._inside("qc", f"{self._id(slide_id)}.jpg")

    def contours(self, slide_id: str) -> Path:
        return self._inside("contours", f"{self._id(slide_id)}.geojson")

    def thumbnail(self, slide_id: str) -> Path | None:
        """A plain thumbnail (None: this layout has none)."""
        return None

    def features_attrs(self, slide_id: str) -> dict[str, str]:
        """Attributes of the bag's ``features`` dataset that this layout's readers expect (none here)."""
        return {}

    def lock(self, slide_id: str) -> Path:
        """The slide's lock file. Its name percent-encodes the id (one safe file name for any string), so this
        path, unlike the others, does not need a valid id: :mod:`mstar_extract.locks` works for any id."""
        return self._inside(LOCKS_DIR, lock_file_name(slide_id))

    def slide(self, slide_id: str) -> SlidePaths:
        """All of one slide's paths."""
        return SlidePaths(slide_id=self._id(slide_id), bag=self.bag(slide_id), pt=self.pt(slide_id),
                          coords=self.coords(slide_id), qc=self.qc(slide_id), contours=self.contours(slide_id),
                          lock=self.lock(slide_id), thumbnail=self.thumbnail(slide_id))

    # -- slide embeddings and zero-shot (mstar_extract.downstream; the same in every layout) ----------------------
    @property
    def slide_features_dir(self) -> Path:
        """``OUT/slide_features``: one ``<slide_id>.h5`` per slide; ``mstar embed-slides`` keeps its manifest, its
        manifest parts and its locks here too (so its rows never mix with an extraction's in ``OUT/manifest.csv``)."""
        return self.root / SLIDE_FEATURES_DIR

    def slide_features(self, slide_id: str) -> Path:
        """One slide's embedding file."""
        return self._inside(SLIDE_FEATURES_DIR, f"{self._id(slide_id)}.h5")

    @property
    def slide_features_table(self) -> Path:
        """Every slide embedding under :attr:`slide_features_dir` in one HDF5 file."""
        return self.root / f"{SLIDE_FEATURES_DIR}.h5"

    @property
    def slide_features_csv(self) -> Path:
        """One row per slide embedding: provenance and file."""
        return self.root / f"{SLIDE_FEATURES_DIR}.csv"

    @property
    def zeroshot_predictions(self) -> Path:
        """Per-slide zero-shot predictions and pooled scores for every top-j."""
        return self.root / f"{ZEROSHOT_NAME}.csv"

    @property
    def zeroshot_metrics(self) -> Path:
        """Accuracy and balanced accuracy per top-j (when labels were given)."""
        return self.root / f"{ZEROSHOT_NAME}_metrics.json"

    # -- the two checks every per-slide path goes through -----------------------------------------------------
    @staticmethod
    def _id(slide_id: str) -> str:
        return validate_slide_id(slide_id)

    def _inside(self, *parts: str) -> Path:
        """``OUT/<parts...>``, refused unless it lies strictly under OUT (normalised, links not followed)."""
        path = self.root.joinpath(*parts)
        normal = Path(os.path.normpath(os.path.abspath(path)))
        if normal == self._root_abs or not normal.is_relative_to(self._root_abs):
            raise UsageError(f"{path}: an output path must stay inside {self.root}")
        return path


class ClamLayout(OutLayout):
    """CLAM's folders: ``create_patches_fp.py``'s ``patches/<id>.h5`` (CLAM coordinate attributes) and
    ``masks/<id>.jpg``; ``extract_features_fp.py``'s ``h5_files/<id>.h5`` and ``pt_files/<id>.pt``. What CLAM's
    scripts and the mSTAR repo's ``Feature_extract`` and downstream tasks read, unchanged."""

    name = "clam"
    coords_format = "clam"
    always_pt = True

    def bag(self, slide_id: str) -> Path:
        return self._inside("h5_files", f"{self._id(slide_id)}.h5")

    def coords(self, slide_id: str) -> Path:
        return self._inside("patches", f"{self._id(slide_id)}.h5")

    def qc(self, slide_id: str) -> Path:
        return self._inside("masks", f"{self._id(slide_id)}.jpg")


def trident_magnification(magnification: float) -> str:
    """The magnification as TRIDENT writes it in folder names: ``20``, ``2.5``, ``33.3333``."""
    m = float(magnification)
    return str(int(round(m))) if abs(m - round(m)) < 1e-9 else f"{m:g}"


TRIDENT_ENCODER_NAMES = {"uni": "uni_v1"}
"""Our model names that TRIDENT knows under another name (its ``enc_name``, which names ``features_<enc_name>``)."""


def trident_encoder_name(model: str) -> str:
    """``features_<this>`` for ``model``: TRIDENT's name for the same weights, else the model name made a plain
    folder name (``timm:vit_small_patch16_224`` -> ``timm-vit_small_patch16_224``)."""
    name = TRIDENT_ENCODER_NAMES.get(model, model)
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


class TridentLayout(OutLayout):
    """TRIDENT's job folder (``Processor``'s segmentation, patching and patch-feature jobs): OUT is the job dir."""

    name = "trident"
    coords_format = "trident"
    context_keys = ("magnification", "patch_size", "overlap")
    geojson_pen = False  # TRIDENT takes every polygon of contours_geojson/<id>.geojson as tissue

    @property
    def patch_dir(self) -> str:
        """``<mag>x_<ps>px_<overlap>px_overlap`` (TRIDENT's ``run_patching_job`` default ``saveto``)."""
        c = self.context
        if c.magnification is None or c.patch_size is None:
            raise UsageError("the trident layout needs the target magnification and patch size")
        return f"{trident_magnification(c.magnification)}x_{int(c.patch_size)}px_{int(c.overlap or 0)}px_overlap"

    @property
    def features_dir(self) -> str:
        """``features_<model>`` (``run_patch_feature_extraction_job``'s default); ``mstar`` when no model is known."""
        return f"features_{trident_encoder_name(self.context.model or 'mstar')}"

    def bag(self, slide_id: str) -> Path:
        return self._inside(self.patch_dir, self.features_dir, f"{self._id(slide_id)}.h5")

    def pt(self, slide_id: str) -> Path:
        return self._inside(self.patch_dir, self.features_dir, f"{self._id(slide_id)}.pt")

    def coords(self, slide_id: str) -> Path:
        return self._inside(self.patch_dir, "patches", f"{self._id(slide_id)}_patches.h5")

    def qc(self, slide_id: str) -> Path:
        return self._inside("contours", f"{self._id(slide_id)}.jpg")

    def contours(self, slide_id: str) -> Path:
        return self._inside("contours_geojson", f"{self._id(slide_id)}.geojson")

    def thumbnail(self, slide_id: str) -> Path | None:
        return self._inside("thumbnails", f"{self._id(slide_id)}.jpg")

    def features_attrs(self, slide_id: str) -> dict[str, str]:
        """What TRIDENT's ``extract_patch_features`` puts on ``features``: ``name``, ``savetodir``, ``encoder``."""
        return {"name": self._id(slide_id), "savetodir": str(self.bag(slide_id).parent),
                "encoder": trident_encoder_name(self.context.model or "mstar")}


LAYOUTS: dict[str, type[OutLayout]] = {cls.name: cls for cls in (OutLayout, ClamLayout, TridentLayout)}
"""Output layouts by name (``--layout``)."""


def layout_class(kind: str) -> type[OutLayout]:
    """The layout class named ``kind`` (UsageError for an unknown name)."""
    try:
        return LAYOUTS[kind]
    except KeyError:
        raise UsageError(f"unknown output layout {kind!r}; choose from {', '.join(LAYOUTS)}") from None


def make_layout(out_dir: str | os.PathLike[str], kind: str = "mstar", context: LayoutContext | None = None) -> OutLayout:
    """The layout ``kind`` of ``out_dir`` (UsageError for an unknown kind)."""
    return layout_class(kind)(out_dir, context)


def layout_from_record(out_dir: str | os.PathLike[str], record: Mapping[str, Any] | None) -> OutLayout:
    """The layout of ``out_dir`` as OUT's settings record (:mod:`mstar_extract.store.record`) describes it: the
    ``output`` group's layout and folder context, the ``features`` group's model. A record without an ``output``
    group predates layouts: ``mstar``."""
    record = record or {}
    output_group, features_group = record.get("output"), record.get("features")
    out = output_group if isinstance(output_group, Mapping) else {}
    feats = features_group if isinstance(features_group, Mapping) else {}
    context = LayoutContext(magnification=out.get("magnification"), patch_size=out.get("patch_size"),
                            overlap=out.get("overlap"), model=feats.get("model"))
    return make_layout(out_dir, str(out.get("layout", "mstar")), context)
