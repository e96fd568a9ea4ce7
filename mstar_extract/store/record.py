"""OUT's settings record ``OUT/mstar_settings.json``: the settings that define every output in OUT.

The first run that writes into OUT records them; every later run (``tile`` or ``extract``, any process) compares
its own settings before any work and refuses (:class:`~mstar_extract.errors.UsageError`, exit 2) when they
differ, naming each difference and the way out (``--overwrite`` or another OUT). So one OUT never mixes bags of
two patch sizes, resolutions, models or stored dtypes.

The record holds groups of keys (built by :func:`mstar_extract.pipeline.record.run_record`)::

    {"mstar_settings": 1, "mstar_extract_version": "...", "created": "...",
     "output":   {"layout": "mstar"},
     "tiling":   {"patch_size": 256, "overlap": 0, "target_mpp": 0.5, "min_tissue": 0.5, ..., "segmentation": {...}},
     "features": {"model": "mstar", "weights_sha256": "...", "dtype": "float32", "decode": "full"}}

A run compares the groups it defines (every run: ``output``, the layout (``--layout``) and what names its
folders; ``tile``: ``tiling``; ``extract``: ``tiling`` and ``features``; ``extract --coords-dir``: ``features``
only, since the coordinates bring their own geometry), key by key, only keys both sides have (a key that a newer
version adds is filled in, never a reason to refuse). A group the record lacks is added (``tile`` then
``extract`` on one OUT: ``extract`` adds ``features``); a record without ``output`` was written before layouts
existed, so it stands for ``{"layout": "mstar"}``. With ``--overwrite`` the run's groups replace the recorded
ones, except the layout: the files of two layouts never share one OUT (:data:`FIXED_KEYS`). Updates are atomic
and serialised by a short lock (``.mstar_settings.json.lock``), so two jobs starting together on an empty OUT
with different settings cannot both proceed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from mstar_extract.errors import RunError, UsageError
from mstar_extract.store.atomic import write_text_atomic
from mstar_extract.store.layout import OutLayout, layout_from_record

RECORD_VERSION = 1
GROUPS = ("output", "tiling", "features")
FIXED_KEYS = ("output.layout",)
"""Keys that ``--overwrite`` cannot change (a new layout would leave the old one's files beside it)."""
LEGACY_OUTPUT = {"layout": "mstar"}
"""The ``output`` group of a record written before layouts existed."""

_OPTIONS = {"target_mpp": "--mpp/--magnification", "weights_sha256": "--weights", "decode": "--fast-decode: decode"}
"""Option names that are not ``--<key with dashes>``."""

Record = Mapping[str, Mapping[str, Any]]
"""``{group: {key: value}}`` (JSON values; ``segmentation`` is a nested object)."""


def read_record(layout: OutLayout) -> dict[str, Any] | None:
    """The recorded settings of OUT, or None when OUT has none yet."""
    path = layout.settings_record
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: not a settings record (JSON object); remove it to record this run's settings")
    doc.setdefault("output", dict(LEGACY_OUTPUT))
    return doc


def recorded_layout(out_dir: str | os.PathLike[str]) -> OutLayout:
    """OUT's layout as its settings record says (``mstar`` when OUT has no record): what ``mstar status`` and
    ``mstar report`` use, so they need no ``--layout``."""
    return layout_from_record(out_dir, read_record(OutLayout(out_dir)))


def _flat(group: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in group.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "none" if v is None else str(v)


def _option(key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    return _OPTIONS.get(name, "--" + name.replace("_", "-"))


def differences(stored: Mapping[str, Any], run: Record, only: tuple[str, ...] | None = None) -> list[str]:
    """``--option THIS (OUT has THAT)`` for every key of the run's groups that the record holds with another value
    (``only``: just these ``group.key`` names)."""
    diffs = []
    for group, values in run.items():
        have = stored.get(group)
        if not isinstance(have, Mapping):
            continue
        old = _flat(have)
        for key, value in _flat(values).items():
            if only is not None and f"{group}.{key}" not in only:
                continue
            if key in old and old[key] != value:
                diffs.append(f"{_option(key)} {_show(value)} (OUT has {_show(old[key])})")
    return diffs


def _refusal(layout: OutLayout, diffs: list[str]) -> UsageError:
    if any(d.startswith("--layout ") for d in diffs):
        way_out = "A layout cannot change in place (not even with --overwrite): use OUT's layout, or another OUT"
    else:
        way_out = "Use the same settings, or --overwrite to redo the slides with the new ones, or another OUT"
    return UsageError(
        f"{layout.root} holds outputs made with other settings ({layout.settings_record.name}): {'; '.join(diffs)}. "
        + way_out)


def _check(layout: OutLayout, stored: Mapping[str, Any] | None, run: Record, overwrite: bool) -> None:
    if stored is not None:
        diffs = differences(stored, run, only=FIXED_KEYS if overwrite else None)
        if diffs:
            raise _refusal(layout, diffs)


def check_record(layout: OutLayout, run: Record, overwrite: bool = False) -> None:
    """Refuse (UsageError) when OUT's record differs from ``run`` (with ``overwrite``: in a :data:`FIXED_KEYS`
    key); writes nothing. Call it before any work."""
    _check(layout, read_record(layout), run, overwrite)


def _merged(stored: dict[str, Any] | None, run: Record, overwrite: bool) -> dict[str, Any]:
    from mstar_extract import __version__

    doc: dict[str, Any] = dict(stored or {})
    if stored is None:
        doc.update(mstar_settings=RECORD_VERSION, mstar_extract_version=__version__,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for group, values in run.items():
        have = doc.get(group)
        if overwrite or not isinstance(have, Mapping):
            doc[group] = dict(values)
        else:
            doc[group] = {**values, **have}  # keys a newer version added are filled in, recorded values kept
    return doc


def record_settings(layout: OutLayout, run: Record, overwrite: bool = False, wait_s: float = 60.0) -> None:
    """Compare ``run`` with OUT's record and update it (create it, add missing groups and keys, or replace the
    run's groups with ``overwrite``), atomically and under the record's lock. UsageError on a difference."""
    from mstar_extract.locks import SlideLock

    layout.root.mkdir(parents=True, exist_ok=True)
    lock = SlideLock(layout.root, "settings record", path=layout.settings_lock, timeout_s=30.0, heartbeat_s=5.0)
    deadline = time.monotonic() + wait_s
    try:  # acquire inside: a signal while the lock is being made leaves no lock (SlideLock.release)
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise RunError(f"{layout.settings_lock}: held by another process for more than {wait_s:.0f} s")
            time.sleep(0.05)
        stored = read_record(layout)
        _check(layout, stored, run, overwrite)
        doc = _merged(stored, run, overwrite)
        if doc != stored:
            write_text_atomic(layout.settings_record, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    finally:
        lock.release()
