"""``python -m mstar_extract ...`` runs the ``mstar`` command line (the same as the ``mstar`` console script).

Useful where the console script is not on ``PATH``, and under ``torchrun``::

    python -m torch.distributed.run --nproc_per_node=2 -m mstar_extract extract slides/ out/
"""

from __future__ import annotations

from mstar_extract.cli import main

if __name__ == "__main__":
    main(prog_name="mstar")
