"""What users do with feature bags next: slide embeddings and zero-shot classification (docs/downstream.md).

* :mod:`.inputs` — the BAGS arguments of ``embed-slides`` and ``zeroshot`` as a list of bags;
* :mod:`.aggregator` — the stage-1 slide aggregator as a slide encoder (load, check a bag's provenance, embed);
* :mod:`.slide_store` — ``slide_features/<id>.h5`` (one embedding per slide) and the run's table;
* :mod:`.embed` — ``mstar embed-slides`` and the ``mstar extract --slide-encoder`` hook;
* :mod:`.prompts` — class prompts (mSTAR's official JSON format) and a labels CSV;
* :mod:`.text` — the report encoder of a zero-shot checkpoint and the class embeddings of a prompt file;
* :mod:`.scoring` — MI-Zero top-j pooling of patch logits, accuracy and balanced accuracy;
* :mod:`.zeroshot` — ``mstar zeroshot``.
"""
