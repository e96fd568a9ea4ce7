"""``mstar zeroshot BAGS... OUT --checkpoint PATH --prompts FILE.json`` — mSTAR's zero-shot slide classification."""

from __future__ import annotations

from typing import Any

import click

from mstar_extract.cli.common import output_options
from mstar_extract.errors import UsageError


def _topj(value: str) -> tuple[int, ...]:
    try:
        js = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise UsageError(f"--topj {value!r}: expected positive integers separated by commas, e.g. 1,5,10,50,100") from None
    if not js or js[0] < 1:
        raise UsageError(f"--topj {value!r}: expected positive integers separated by commas, e.g. 1,5,10,50,100")
    return js


@click.command(context_settings={"max_content_width": 110})
@click.argument("bags", nargs=-1, required=True, metavar="BAGS...")
@click.argument("out", type=click.Path(file_okay=False), metavar="OUT")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="Zero-shot checkpoint (zeroshot.pth of stage 2, or `mstar pretrain export`): report encoder + proj.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), metavar="FILE.json",
              help='Class prompts, mSTAR\'s format: {"0": {"classnames": {label: [names]}, "templates": ["... CLASSNAME ..."]}}.')
@click.option("--labels", type=click.Path(dir_okay=False), default=None, metavar="FILE.csv",
              help="CSV with slide_id and a label column: "
                   "adds accuracy and balanced accuracy (OUT/zeroshot_metrics.json). [default: none]")
@click.option("--label-column", default="label", show_default=True, help="Name of the label column of --labels.")
@click.option("--topj", default="1,5,10,50,100", show_default=True, metavar="J,J,...",
              help="Top-j pooling: a class's slide score is the mean of its j highest patch logits.")
@click.option("--device", default=None, metavar="auto|cuda|cuda:N|cpu",
              help="Where the text encoder and proj run. [default: $MSTAR_DEVICE, else auto]")
@click.option("--text-model", default=None, metavar="NAME|DIR",
              help="Config and tokenizer for a checkpoint without our text record (mSTAR's "
                   "own used dmis-lab/biobert-base-cased-v1.2). [default: the checkpoint's]")
@output_options()
def zeroshot(bags: tuple[str, ...], out: str, checkpoint: str, prompts: str, labels: str | None, label_column: str,
             topj: str, device: str | None, text_model: str | None, reporter: Any) -> int:
    """Classify slides zero-shot: OUT/zeroshot.csv (prediction and per-class scores for every top-j) and, with
    --labels, OUT/zeroshot_metrics.json (accuracy and balanced accuracy per top-j).

    BAGS are feature bags of the stage-2 student (`mstar extract --weights student.pth`), folders of bags or
    glob patterns. Patch features go through the checkpoint's proj, their cosine similarity with each class's
    prompt embedding is pooled over the top-j patches (MI-Zero), as in mSTAR's official code.
    Exit code 0 when every slide was scored, 1 if any failed, 2 for usage errors.

    \b
    Examples:
      mstar zeroshot out/features zs/ --checkpoint runs/stage2/zeroshot.pth --prompts prompts.json
      mstar zeroshot out/ zs/ --checkpoint zeroshot.pth --prompts camelyon.json --labels labels.csv --topj 10,50
    """
    from mstar_extract.downstream.inputs import resolve_bags
    from mstar_extract.downstream.zeroshot import ZeroShotSettings, run_zeroshot
    from mstar_extract.envdefaults import default_device

    settings = ZeroShotSettings(checkpoint=checkpoint, prompts=prompts, labels=labels, label_column=label_column,
                                topj=_topj(topj), device=default_device(device), text_model=text_model,
                                debug=reporter.debug)
    return run_zeroshot(resolve_bags(bags), out, settings, reporter)
