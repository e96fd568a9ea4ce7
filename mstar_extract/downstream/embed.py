"""``mstar embed-slides BAGS... OUT --aggregator PATH`` and the ``mstar extract --slide-encoder PATH`` hook.

Per bag (:func:`embed_bag`): the bag must be complete and valid (:func:`mstar_extract.store.bags.validate_bag`)
and from the patch extractor the aggregator was trained on (:meth:`SlideEncoder.bag_problem`; otherwise the
slide fails with that reason); a bag without patches is ``no_tissue`` (no embedding); a current embedding is
``skipped`` (:func:`~mstar_extract.downstream.slide_store.embedding_state`), one of another aggregator fails
unless ``--overwrite``; otherwise the aggregator embeds all patches and ``slide_features/<id>.h5`` is written.

``embed-slides`` (:func:`run_embed_slides`) uses the per-slide bookkeeping of ``extract``
(:class:`~mstar_extract.pipeline.runner.SlideRunner`: a lock per slide, so several jobs can share OUT, manifest
rows, events, progress, exit code), rooted at ``OUT/slide_features`` so that its manifest never mixes with an
extraction's. ``extract --slide-encoder`` calls :func:`embed_after_bag` once per slide, when the slide's outcome
is known: a slide whose bag is done (or was already complete) gets its embedding under the same lock, and a
failure to embed makes the slide ``failed`` (the bag stays; a rerun skips it and embeds it again). Both end
with :func:`~mstar_extract.downstream.slide_store.collect_table`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar_extract.console import Reporter
from mstar_extract.downstream.aggregator import SlideEncoder
from mstar_extract.downstream.slide_store import collect_table, embedding_state, plain_attr, write_embedding
from mstar_extract.errors import reason_of
from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner
from mstar_extract.store.layout import OutLayout, make_layout

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry, SlideRef

log = logging.getLogger("mstar")


@dataclass(frozen=True)
class EmbedSettings:
    """Options of ``mstar embed-slides``."""

    aggregator: str
    device: str = "auto"
    overwrite: bool = False
    on_error: str = "skip"
    lock_timeout: float = 600.0
    debug: bool = False


def _bag_facts(bag: Path) -> tuple[dict[str, Any], int, int]:
    """(root attrs, rows, feature size) of a bag."""
    import h5py

    with h5py.File(bag, "r") as f:
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
        n, d = (int(x) for x in f["features"].shape)
    return attrs, n, d


def _read_features(bag: Path) -> Any:
    import h5py

    with h5py.File(bag, "r") as f:
        return f["features"][()]


def embed_bag(entry: SlideRef, bag: Path, out: Path, encoder: SlideEncoder, overwrite: bool = False) -> SlideOutcome:
    """Embed one bag into ``out``; any per-slide problem becomes the outcome's one-line reason."""
    from mstar_extract.store.bags import validate_bag

    t0 = time.monotonic()
    problem = validate_bag(bag)
    if problem is None:
        attrs, n, d = _bag_facts(bag)
        problem = encoder.bag_problem(attrs, d)
    if problem is not None:
        return SlideOutcome.failed(entry, problem, seconds=0.0)
    if n == 0:
        return SlideOutcome(entry.slide_id, str(entry.path), "no_tissue", n_patches=0, seconds=0.0)
    identity = {"bag_created": str(attrs.get("created", "")), "n_patches": n,
                "feature_weights_sha256": str(attrs.get("weights_sha256", ""))}
    state = embedding_state(out, encoder.sha256, identity)
    if not overwrite and state.kind == "current":
        return SlideOutcome.skipped(entry, "", n_patches=n, extra={"slide_features": str(out)})
    if not overwrite and state.kind == "foreign":
        return SlideOutcome.failed(entry, state.detail, seconds=0.0)
    emb = encoder.embed(_read_features(bag))
    write_embedding(out, emb, {
        "slide_id": entry.slide_id, "bag": str(bag), **identity, "feature_model": str(attrs.get("model", "")),
        "feature_dim": d, "aggregator": str(encoder.path), "aggregator_sha256": encoder.sha256,
    })
    seconds = time.monotonic() - t0
    return SlideOutcome(entry.slide_id, str(entry.path), "done", n_patches=n, seconds=round(seconds, 3),
                        patches_per_s=round(n / max(seconds, 1e-9), 2), extra={"slide_features": str(out)})


def _embed_guarded(entry: SlideEntry, layout: OutLayout, encoder: SlideEncoder, settings: EmbedSettings) -> SlideOutcome:
    try:
        return embed_bag(entry, Path(entry.path), layout.slide_features(entry.slide_id), encoder, settings.overwrite)
    except Exception as exc:  # a per-slide failure, one line
        if settings.debug:
            log.exception("embedding %s failed", entry.path)
        return SlideOutcome.failed(entry, reason_of(exc))


def run_embed_slides(entries: Sequence[SlideEntry], out_dir: str | Path, settings: EmbedSettings,
                     reporter: Reporter | None = None, encoder: SlideEncoder | None = None) -> int:
    """Embed every bag of ``entries`` into ``out_dir``; returns the exit code (0, or 1 if any slide failed)."""
    reporter = reporter or Reporter()
    layout = make_layout(out_dir)
    encoder = encoder or SlideEncoder.load(settings.aggregator, settings.device)
    reporter.info(f"aggregator {encoder.path} ({encoder.in_dim}→{encoder.dim}) on {encoder.device}; "
                  f"{len(entries)} bag(s)")
    runner = SlideRunner(layout.slide_features_dir, reporter, total=len(entries), command="embed-slides",
                         lock_timeout=settings.lock_timeout)
    try:
        for entry in entries:
            if entry.error:
                runner.finish(SlideOutcome.failed(entry, str(entry.error), seconds=0.0))
            elif not runner.begin(entry):
                runner.finish(SlideOutcome.skipped(entry, "taken by another process"))
            else:
                outcome = _embed_guarded(entry, layout, encoder, settings)
                runner.finish(outcome)
                if outcome.status == "failed" and settings.on_error == "fail":
                    reporter.warn("stopped after the first failure (--on-error fail)")
                    break
    except KeyboardInterrupt as exc:
        runner.close(interrupted=exc)
        raise
    code = runner.close()
    finish_table(layout, reporter)
    return code


def finish_table(layout: OutLayout, reporter: Reporter) -> None:
    """Rebuild the run's table and say where it is."""
    n = collect_table(layout)
    if n:
        reporter.info(f"slide embeddings: {n} in {layout.slide_features_table} and {layout.slide_features_csv}")


def embed_after_bag(encoder: SlideEncoder, layout: OutLayout, outcome: SlideOutcome) -> SlideOutcome:
    """``extract --slide-encoder``: the slide's embedding once its bag is complete (``done``, or ``skipped``
    because complete); other outcomes pass unchanged. A failure to embed makes the outcome ``failed``."""
    if outcome.status not in ("done", "skipped") or (outcome.status == "skipped" and outcome.error):
        return outcome
    try:
        result = embed_bag(outcome, layout.bag(outcome.slide_id), layout.slide_features(outcome.slide_id), encoder)
    except Exception as exc:  # noqa: BLE001 - a per-slide failure, one line
        return replace(outcome, status="failed", error=f"slide embedding: {reason_of(exc)}")
    if result.status == "failed":
        return replace(outcome, status="failed", error=f"slide embedding: {result.error}")
    return replace(outcome, extra={**outcome.extra, **result.extra})
