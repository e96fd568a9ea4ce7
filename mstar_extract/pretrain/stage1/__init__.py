"""Stage 1: slide-level contrastive pretraining of the TransMIL aggregator across WSI × report × RNA-Seq.

Modules: :mod:`.config` (the YAML tree), :mod:`.data` (manifest, gene table, dataset), :mod:`.transmil` (the
aggregator), :mod:`.text` (report encoder), :mod:`.genes` (RNA-Seq encoder), :mod:`.losses`, :mod:`.model`
(the three encoders together), :mod:`.validate` (validation losses and retrieval), :mod:`.train` (the run),
:mod:`.export` (teacher file, mSTAR downstream layout), :mod:`.toydata` (generated data for tests/examples).
"""

from __future__ import annotations

from typing import Any

from mstar_extract.pretrain.stage1.config import Stage1Config

CONFIG_CLASS = Stage1Config


def main(cfg: Stage1Config, resume: str | None = None, reporter: Any = None) -> int:
    """``mstar pretrain --stage 1`` (see :func:`mstar_extract.pretrain.stage1.train.main`)."""
    from mstar_extract.pretrain.stage1.train import main as run

    return run(cfg, resume=resume, reporter=reporter)
