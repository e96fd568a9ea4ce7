"""`mstar pretrain --stage {1,2}`: a thin layer over the stage packages ``mstar_extract.pretrain.stage1``/``stage2``.

Contract with a stage package ``mstar_extract.pretrain.stage<N>``: it exposes ``CONFIG_CLASS`` (the root config
dataclass; ``--out`` sets its ``run.out_dir``, ``--init`` its ``student.init``) and ``main(config_object,
resume=None, reporter=None) -> int``. A missing stage module is exit 2, "stage N is not implemented yet".
Run it on several processes with ``torchrun --nproc_per_node=G $(which mstar) pretrain ...``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from mstar_extract.cli.common import output_options
from mstar_extract.errors import UsageError


def _stage_module(stage: int) -> Any:
    name = f"mstar_extract.pretrain.stage{stage}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise UsageError(f"stage {stage} is not implemented yet") from None
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", type=click.Choice(["1", "2"]), required=True, help="1 = slide-level multimodal contrastive; 2 = self-taught patch extractor.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (missing keys take the documented defaults; see docs/pretrain.md).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config value, e.g. --set optim.lr=1e-4 (repeatable).")
@click.option("--resume", default=None, metavar="auto|PATH", help="Continue from the run's latest checkpoint (auto) or from a checkpoint file.")
@click.option("--out", "out_dir", default=None, metavar="DIR", help="Run folder (overrides run.out_dir).")
@click.option("--init", default=None, metavar="mstar|uni|PATH|random", help="Stage 2 only: student initialisation (overrides student.init).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@output_options()
def pretrain(stage: str, config_path: str | None, overrides: tuple[str, ...], resume: str | None, out_dir: str | None,
             init: str | None, print_config: bool, reporter: Any) -> int:
    """Run mSTAR pretraining stage 1 or 2 from a YAML config.

    \b
    Examples:
      mstar pretrain --stage 1 --config examples/pretrain/stage1_tiny.yaml --out runs/stage1_tiny
      mstar pretrain --stage 1 --config stage1.yaml --resume auto
      torchrun --nproc_per_node=8 $(which mstar) pretrain --stage 1 --config stage1.yaml
    """
    from mstar_extract.pretrain.config import dump_yaml, load_config

    module = _stage_module(int(stage))
    if init is not None:
        if stage != "2":
            raise UsageError(f"--init is not an option of stage {stage}")
        overrides = (*overrides, f"student.init={init}")
    cfg = load_config(module.CONFIG_CLASS, config_path, overrides)
    if out_dir is not None:
        cfg.run.out_dir = out_dir
    if print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    return int(module.main(cfg, resume=resume, reporter=reporter) or 0)
