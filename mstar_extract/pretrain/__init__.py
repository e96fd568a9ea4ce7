"""mSTAR's two pretraining stages (docs/pretrain.md).

Shared by both stages: :mod:`.config` (dataclass configs + YAML + ``--set``), :mod:`.dist` (torchrun, gathers
with gradients), :mod:`.checkpoint` (atomic checkpoints, ``--resume``, the one safe ``torch.load``),
:mod:`.loop` (the training loop: AMP, clipping, metrics, exact resume) and :mod:`.sampler`.

One subpackage per stage, each exposing ``CONFIG_CLASS`` and ``main(cfg, resume, reporter)`` for
``mstar pretrain --stage N``:

* :mod:`.stage1` — slide-level contrastive learning of a TransMIL aggregator across WSI feature bags, pathology
  reports and RNA-Seq; exports the stage-2 teacher file and the aggregator in mSTAR's downstream layout.
* :mod:`.stage2` — self-taught training of the patch extractor against the frozen stage-1 aggregator; exports
  the student in the released mSTAR weights format.

Everything here imports torch, so the command line imports this package only inside the command body.
"""
