"""`mstar pretrain --stage {1,2}`: a thin layer over the stage packages ``mstar_extract.pretrain.stage1``/``stage2``;
`mstar pretrain export --stage1 RUN --stage2 RUN OUT.pth`: the zero-shot checkpoint of two runs
(:mod:`mstar_extract.pretrain.zeroshot_export`).

Contract with a stage package ``mstar_extract.pretrain.stage<N>``: it exposes ``CONFIG_CLASS`` (the root config
dataclass; ``--out`` sets its ``run.out_dir``, ``--init`` its ``student.init``) and ``main(config_object,
resume=None, reporter=None) -> int``. A missing stage module is exit 2, "stage N is not implemented yet".
Run it on several processes with ``torchrun --nproc_per_node=G $(which mstar) pretrain ...``.

``pretrain`` is a click group that trains when no subcommand is named (so ``mstar pretrain --stage 1 ...`` keeps
working) and runs ``export`` when it is.
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


def _train(stage: str | None, config_path: str | None, overrides: tuple[str, ...], resume: str | None,
           out_dir: str | None, init: str | None, print_config: bool, reporter: Any) -> int:
    """Train stage ``stage`` (the body of ``mstar pretrain --stage N``)."""
    from mstar_extract.pretrain.config import dump_yaml, load_config

    if stage is None:
        raise UsageError("--stage 1 or --stage 2 is required (or: mstar pretrain export --stage1 RUN --stage2 RUN OUT.pth)")
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


_train_guarded = output_options()(_train)
"""``_train`` behind the output options and the error → exit-code boundary (it exits the process)."""


def _with_output_options(func: Any) -> Any:
    """Give ``func`` the click parameters of :func:`output_options` (``-q``, ``-v``, ``--debug``, ``--jsonl``)."""
    # click's decorators keep their parameters on the function object, which the type of a function does not know
    func.__click_params__ = list(getattr(func, "__click_params__", [])) + list(_train_guarded.__click_params__)  # type: ignore[attr-defined]
    return func


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", type=click.Choice(["1", "2"]), default=None,
              help="1 = slide-level multimodal contrastive; 2 = self-taught patch extractor. Required to train.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (missing keys take the documented defaults; see docs/pretrain.md).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set optim.lr=1e-4 (repeatable).")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue from the run's latest checkpoint (auto) or from a checkpoint file.")
@click.option("--out", "out_dir", default=None, metavar="DIR", help="Run folder (overrides run.out_dir).")
@click.option("--init", default=None, metavar="mstar|uni|PATH|random",
              help="Stage 2 only: student initialisation (overrides student.init).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@_with_output_options
@click.pass_context
def pretrain(ctx: click.Context, **kw: Any) -> None:
    """Run mSTAR pretraining stage 1 or 2 from a YAML config; `export` writes a zero-shot checkpoint.

    \b
    Examples:
      mstar pretrain --stage 1 --config examples/pretrain/stage1_tiny.yaml --out runs/stage1_tiny
      mstar pretrain --stage 1 --config stage1.yaml --resume auto
      torchrun --nproc_per_node=8 $(which mstar) pretrain --stage 1 --config stage1.yaml
      mstar pretrain export --stage1 runs/stage1 --stage2 runs/stage2 zeroshot.pth
    """
    if ctx.invoked_subcommand is None:
        _train_guarded(**kw)


@pretrain.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage1", required=True, type=click.Path(exists=True), metavar="RUN",
              help="Stage-1 run folder (or its text_mstar.pth): the report encoder.")
@click.option("--stage2", required=True, type=click.Path(exists=True), metavar="RUN",
              help="Stage-2 run folder (or its proj.pth): proj and the student it belongs to.")
@click.argument("out", type=click.Path(dir_okay=False), metavar="OUT.pth")
@output_options(jsonl=False)
def export(stage1: str, stage2: str, out: str, reporter: Any) -> int:
    """Write the zero-shot checkpoint OUT.pth of a stage-1 and a stage-2 run, in mSTAR's layout
    (model_state_dict: text_encoder.*, proj_text.*, proj.*), for `mstar zeroshot --checkpoint` and mSTAR's code.

    A stage-1 run trained before the report encoder was exported is read from its newest checkpoint.

    \b
    Example:
      mstar pretrain export --stage1 runs/stage1 --stage2 runs/stage2 zeroshot.pth
    """
    from mstar_extract.pretrain.zeroshot_export import export_from_runs, load_zeroshot, official_code_note

    path = export_from_runs(stage1, stage2, out)
    note = official_code_note(load_zeroshot(path))
    if note:
        reporter.warn(note)
    reporter.info(f"zero-shot checkpoint {path}")
    click.echo(str(path))
    return 0
