"""An independent implementation of the mSTAR reference preprocessing, for fidelity tests and benchmarks.

The mSTAR authors' ``Feature_extract`` (github.com/Innse/mSTAR, ``dataset/dataset_h5.py`` and
``models/mSTAR.py``) computes each model input as::

    img = wsi.read_region(coord, patch_level, (patch_size, patch_size)).convert('RGB')   # openslide
    x = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                            transforms.Normalize(mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225))])(img)

This module writes that out with openslide-python, PIL and torchvision only — nothing from
``mstar_extract.reading`` — so the reader (any path: decoded tiles, regions, plain images, another tile source)
can be compared with it. Plain images, which OpenSlide cannot open, are read with PIL and cropped with PIL's
``crop`` (black outside the image, as OpenSlide's transparent pixels after ``convert('RGB')``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def mstar_transform(input_size: int = 224) -> Any:
    """The reference transform exactly as ``get_mSTAR_trans()`` builds it (torchvision)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(input_size), transforms.ToTensor(),
                               transforms.Normalize(mean=MEAN, std=STD)])


class ReferenceSlide:
    """``read_region(xy, level, size) -> PIL RGB image`` as the reference reads it: OpenSlide for slides, PIL for
    plain images. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from PIL import Image

        self.path = os.fspath(path)
        self._osr = None
        self._img = None
        if os.path.splitext(self.path)[1].lower() in PLAIN_IMAGE_SUFFIXES:
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(self.path) as im:
                self._img = im.convert("RGB")
        else:
            import openslide

            self._osr = openslide.OpenSlide(self.path)

    def read_region(self, xy: Sequence[int], level: int, size: int) -> Any:
        x, y = int(xy[0]), int(xy[1])
        if self._osr is not None:
            return self._osr.read_region((x, y), int(level), (int(size), int(size))).convert("RGB")
        if level != 0:
            raise ValueError("a plain image has one level")
        return self._img.crop((x, y, x + int(size), y + int(size)))  # type: ignore[union-attr]

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()

    def __enter__(self) -> ReferenceSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_uint8(path: str | os.PathLike[str], coords: Iterable[Sequence[int]], level: int, size: int,
                    input_size: int = 224) -> np.ndarray:
    """(N, S, S, 3) uint8: the image ``ToTensor`` receives, i.e. ``Resize(S)`` of the read footprint."""
    from torchvision import transforms

    resize = transforms.Resize(input_size)
    with ReferenceSlide(path) as ref:
        imgs = [np.asarray(resize(ref.read_region(xy, level, size))) for xy in coords]
    return np.stack(imgs) if imgs else np.zeros((0, input_size, input_size, 3), np.uint8)


def reference_tensors(path: str | os.PathLike[str], coords: Iterable[Sequence[int]], level: int, size: int,
                      input_size: int = 224) -> Any:
    """(N, 3, S, S) float32 torch tensor: the reference's full transform of every footprint."""
    import torch

    tf = mstar_transform(input_size)
    with ReferenceSlide(path) as ref:
        xs = [tf(ref.read_region(xy, level, size)) for xy in coords]
    return torch.stack(xs) if xs else torch.zeros((0, 3, input_size, input_size))


@dataclass
class InputDiff:
    """How far uint8 model inputs are from the reference's (grey levels)."""

    n_patches: int
    max_abs: int
    mean_abs: float
    n_values_differing: int
    worst_patch: int

    @property
    def identical(self) -> bool:
        return self.max_abs == 0

    def __str__(self) -> str:
        return (f"{self.n_patches} patches: max |diff| {self.max_abs}, mean {self.mean_abs:.4f} grey levels, "
                f"{self.n_values_differing} values differ (worst patch {self.worst_patch})")


def compare_uint8(ours: np.ndarray, ref: np.ndarray) -> InputDiff:
    """Compare two (N, S, S, 3) uint8 input stacks (same order). Shapes must agree."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape or ours.dtype != np.uint8 or ref.dtype != np.uint8:
        raise ValueError(f"cannot compare {ours.shape} {ours.dtype} with {ref.shape} {ref.dtype}")
    if ours.shape[0] == 0:
        return InputDiff(0, 0, 0.0, 0, -1)
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    per_patch = d.reshape(d.shape[0], -1).max(axis=1)
    return InputDiff(int(d.shape[0]), int(d.max()), float(d.mean()), int(np.count_nonzero(d)), int(per_patch.argmax()))


def relative_l2(a: Any, b: Any) -> np.ndarray:
    """Per-row ``||a - b|| / ||b||`` of two (N, D) feature arrays (``b`` = the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


_VIT_LARGE_KW: dict[str, Any] = dict(pretrained=False, img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                     dynamic_img_size=True)


def reference_vit_large(gamma: float = 0.5) -> Any:
    """mSTAR's architecture as the authors build it (timm ``vit_large_patch16_224``, ``init_values=1e-5``,
    ``dynamic_img_size``), seeded random weights, every LayerScale gamma set to ``gamma`` (with timm's 1e-5 all
    outputs look alike, so feature comparisons would prove little), fp32, eval mode, on the CPU."""
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("vit_large_patch16_224", **_VIT_LARGE_KW).eval()
    blocks: Any = net.blocks  # an nn.Sequential of timm Blocks (typed as Tensor | Module by nn.Module's getattr)
    with torch.no_grad():
        for blk in blocks:
            blk.ls1.gamma.fill_(gamma)
            blk.ls2.gamma.fill_(gamma)
    return net


def shared_reference_vit_large(folder: str | os.PathLike[str]) -> Path:
    """The state dict of :func:`reference_vit_large` as a file in ``folder`` (``vit_large_random.pth``, 1.2 GB),
    written by the first process that asks and read by the others (a lock in ``folder`` orders them): the test
    processes of one run (pytest-xdist workers) pay for the 300 M-parameter random initialisation once."""
    import fcntl

    import torch

    path = Path(folder) / "vit_large_random.pth"
    with open(Path(folder) / "vit_large_random.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(reference_vit_large().state_dict(), tmp)
            os.replace(tmp, path)
    return path


def load_reference_vit_large(path: str | os.PathLike[str]) -> Any:
    """The network of :func:`reference_vit_large` holding the tensors of ``path`` (a file of
    :func:`shared_reference_vit_large`): built on the ``meta`` device and the file mapped, not read, so a second
    process has it in a moment. fp32, eval mode, on the CPU."""
    import timm
    import torch

    with torch.device("meta"):
        net = timm.create_model("vit_large_patch16_224", **_VIT_LARGE_KW)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True), strict=True, assign=True)
    return net.eval()
