"""Patch encoders: the registry (``mstar``, ``uni``, ``timm:<name>``), weights, preprocessing, inference.

Importing this package is light (no torch); :class:`Encoder` and friends load torch on first access.
"""

from __future__ import annotations

from typing import Any

from mstar_extract.models.registry import DEFAULT_MODEL, EncoderSpec, get_spec, list_specs

_LAZY = {
    "Encoder": "mstar_extract.models.encoder",
    "benchmark_model": "mstar_extract.models.encoder",
    "resolve_device": "mstar_extract.models.encoder",
    "resolve_precision": "mstar_extract.models.encoder",
    "use_device": "mstar_extract.models.encoder",
    "preprocess": "mstar_extract.models.preprocess",
    "ResolvedWeights": "mstar_extract.models.weights",
    "resolve_weights": "mstar_extract.models.weights",
    "sha256_file": "mstar_extract.models.weights",
}

__all__ = ["DEFAULT_MODEL", "EncoderSpec", "get_spec", "list_specs", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mstar_extract.models' has no attribute {name!r}")
