"""mSTAR's two pretraining stages (design §6).

Stage 1 (:mod:`.stage1`): slide-level contrastive learning of a TransMIL aggregator across WSI feature bags,
pathology reports and RNA-Seq. Reusable parts: :mod:`.config` (dataclass configs + YAML + ``--set``),
:mod:`.dist` (torchrun / gathers with gradients), :mod:`.checkpoint`, :mod:`.loop` (training loop),
:mod:`.sampler`, :mod:`.transmil` (aggregator, per-patch contextual embeddings), :mod:`.export` (teacher file).
Everything here imports torch, so the command line imports this package only inside the command body.
"""
