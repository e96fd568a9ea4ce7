"""Stage 2: self-taught training of the patch extractor against the frozen stage-1 aggregator.

Modules: :mod:`.config` (the YAML tree), :mod:`.teacher` (per-patch targets), :mod:`.data` (manifest, batch
schedule, dataset), :mod:`.read` (patches at bag coordinates), :mod:`.augment`, :mod:`.student` (student + proj,
EMA), :mod:`.losses`, :mod:`.train` (the run), :mod:`.export` (student.pth, proj.pth, model card),
:mod:`.bench` (``mstar bench train``), :mod:`.toydata` (generated slides and bags for tests/examples).
"""

from __future__ import annotations

from typing import Any

from mstar_extract.pretrain.stage2.config import Stage2Config

CONFIG_CLASS = Stage2Config


def main(cfg: Stage2Config, resume: str | None = None, reporter: Any = None) -> int:
    """``mstar pretrain --stage 2`` (see :func:`mstar_extract.pretrain.stage2.train.run_stage2`)."""
    from mstar_extract.pretrain.stage2.train import run_stage2

    run_stage2(cfg, resume=resume, reporter=reporter)
    return 0
