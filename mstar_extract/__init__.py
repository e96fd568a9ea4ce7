"""mstar: mSTAR patch-feature extraction for whole-slide images, and mSTAR's two-stage pretraining.

The package is organised as its data flow (one module or subpackage per box; docs/architecture.md):

``slides`` (open, metadata, mpp) -> ``tissue`` (mask, contours, holes, pen) -> ``tiling`` (coords at target mpp)
-> ``reading`` (uint8 patch batches) -> ``models`` (mSTAR ViT-L) -> ``store`` (HDF5 bags, atomic) -> manifest.

``pretrain`` holds the two pretraining stages. Heavy libraries (torch, timm, transformers) are imported lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
