"""The patch encoder: a registry network + resolved weights, on a device, embedding uint8 batches.

>>> enc = Encoder.create("mstar", weights="hf", device="auto")          # doctest: +SKIP
>>> feats = enc.embed(uint8_batch)                                        # (B, 1024) float32, on enc.device

Inference runs under ``torch.inference_mode`` with autocast per ``precision`` (``bf16`` default on CUDA,
``fp32`` on the CPU, ``fp16`` on request), channels-last input, and optionally ``torch.compile`` (for one batch
size: :meth:`Encoder.warm_up` fixes it, smaller batches are padded to it).

:func:`device_problem` tells the errors of the machine (out of GPU memory, a CUDA error, a failed compile) from
the problems of one input: the pipeline stops the whole run on the former instead of failing every slide.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from mstar_extract.errors import UsageError, first_line
from mstar_extract.models.preprocess import as_uint8_batch, preprocess
from mstar_extract.models.registry import EncoderSpec, get_spec
from mstar_extract.models.weights import ResolvedWeights, build_with_weights, resolve_weights

log = logging.getLogger("mstar")

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda``/``cuda:N``/``cpu`` checked (UsageError)."""
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is available here (use --device cpu or auto)")
        n = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index  # "cuda": the current device
        if index >= n:
            raise UsageError(f"--device {text}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    raise UsageError(f"--device {text}: unsupported device type (use auto, cpu, cuda or cuda:N)")


def use_device(device: str | torch.device | None = "auto") -> torch.device:
    """:func:`resolve_device`, then make a CUDA device this process's current one (``torch.cuda.set_device``).

    Without it, Inductor's compiled kernels, pinned host buffers and a bare ``torch.cuda.synchronize()`` use
    cuda:0 whatever device the model is on (a ``--devices`` process or torchrun rank given cuda:3 would also
    hold memory on GPU 0).
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (that GPU's, not the current one's); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``None``/``auto`` -> :func:`~mstar_extract.models.precision.auto_precision`: ``bf16`` on a GPU with bf16
    hardware, ``fp16`` on an older GPU (V100, T4: bf16 only emulated; one warning line says so), ``fp32`` on the
    CPU. An explicit value is kept as given."""
    from mstar_extract.models.precision import auto_precision

    p = (precision or "auto").strip().lower()
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "32": "fp32"}
    p = aliases.get(p, p)
    if p == "auto":
        chosen = auto_precision(device)
        if chosen == "fp16":
            log.warning("%s (%s) has no bf16 hardware (compute capability %s < 8.0): running fp16 instead of bf16",
                        device, torch.cuda.get_device_name(device),
                        ".".join(map(str, torch.cuda.get_device_capability(device))))
        return chosen
    if p not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return p


_CUDA_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error",
                 "NVIDIA driver", "NCCL error", "device-side assert")
"""Texts of the RuntimeErrors that the CUDA runtime and its libraries raise through torch."""
_COMPILE_MODULES = ("torch._dynamo", "torch._inductor")
"""Exceptions raised from these modules are compile failures (tracing, lowering, the C++/Triton compiler)."""


def device_problem(exc: BaseException) -> str | None:
    """One line when ``exc`` (or an exception it was raised from) is an error of the machine, not of the input:
    the device out of memory (``torch.OutOfMemoryError``), a CUDA error (``torch.AcceleratorError``, or a
    RuntimeError whose text is one of the CUDA runtime's, e.g. ``CUDA error: an illegal memory access``: the
    CUDA context is then unusable), or a ``torch.compile`` failure (an exception of ``torch._dynamo`` /
    ``torch._inductor``). None for anything else. Host ``MemoryError`` is not one (a slide may be too big)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        line = first_line(cur)
        if isinstance(cur, torch.OutOfMemoryError):
            return f"out of memory on the device ({line}); use a smaller --batch-size"
        if type(cur).__module__.startswith(_COMPILE_MODULES):
            return f"torch.compile failed ({first_line(cur, with_type=True)}); run without --compile"
        accelerator = getattr(torch, "AcceleratorError", None)
        if (accelerator is not None and isinstance(cur, accelerator)) or (
                isinstance(cur, RuntimeError) and any(m in str(cur) for m in _CUDA_MARKERS)):
            return f"device error ({line})"
        cur = cur.__cause__ or cur.__context__
    return None


class Encoder:
    """One patch encoder ready for inference. Build it with :meth:`create`."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: torch.nn.Module,
        weights: ResolvedWeights,
        device: torch.device,
        precision: str,
        compile: bool = False,
        compile_backend: str | None = None,
    ) -> None:
        self.spec = spec
        self.weights = weights
        self.device = device
        self.precision = precision
        self.compile = compile
        self.compile_backend = compile_backend
        self.model = model.eval().requires_grad_(False)
        self._forward: Any = self.model
        self._compiled_batch: int | None = None
        self.warmed_batch: int | None = None
        """The batch size of the last successful :meth:`warm_up` (None: not warmed up)."""
        self.to(device)

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def create(
        cls,
        model: str | EncoderSpec | None = "mstar",
        weights: str | os.PathLike[str] | ResolvedWeights | None = "hf",
        device: str | torch.device | None = "auto",
        precision: str | None = None,
        compile: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        compile_backend: str | None = None,
    ) -> Encoder:
        """Spec by name, weights resolved (PATH/hf/random) and loaded strictly, moved to ``device``.

        ``compile_backend`` is passed to ``torch.compile`` (default inductor; ``eager`` traces only).
        """
        spec = model if isinstance(model, EncoderSpec) else get_spec(model)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(
            spec, weights, cache_dir=cache_dir, token=token
        )
        net = build_with_weights(spec, resolved)
        return cls(spec, net, resolved, dev, prec, compile=compile, compile_backend=compile_backend)

    def to(self, device: str | torch.device) -> Encoder:
        """Move the network to ``device`` (channels-last; a CUDA device becomes this process's current device,
        :func:`use_device`); a compiled graph is rebuilt lazily."""
        self.device = use_device(device)
        self.model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
        self._forward = self.model
        self._compiled_batch = None
        self.warmed_batch = None
        if self.compile:
            # one static graph: every batch is padded to the warm-up size (embed), so nothing recompiles; without a
            # backend, torch.compile's own default (its default value differs between torch versions)
            if self.compile_backend:
                self._forward = torch.compile(self.model, dynamic=False, backend=self.compile_backend)
            else:
                self._forward = torch.compile(self.model, dynamic=False)
        return self

    # ---------------------------------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def weights_sha256(self) -> str:
        return self.weights.sha256

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    # ---------------------------------------------------------------------------------------- inference
    def warm_up(self, batch_size: int) -> float:
        """Run one batch of ``batch_size`` blank patches through preprocessing and the model (compiling it with
        ``compile``) and wait for the device; returns the seconds it took.

        Called before any slide is touched, so that what cannot work at this batch size on this machine (out of
        memory, a compile failure, a broken GPU) fails once, here, instead of failing every slide. With
        ``compile`` the graph is built for ``batch_size``: later batches are padded to it (:meth:`embed`), so a
        small slide coming first never causes a recompile."""
        if self.compile:
            self._compiled_batch = int(batch_size)
        t0 = time.perf_counter()
        blank = torch.zeros((int(batch_size), self.input_size, self.input_size, 3), dtype=torch.uint8,
                            device=self.device)
        self.embed(blank)
        synchronize(self.device)
        self.warmed_batch = int(batch_size)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` patches -> float32 ``(B, D)`` features on :attr:`device`.

        Patches of any size are resized (antialiased bilinear) to :attr:`input_size` on the device.
        With ``compile`` one batch size is kept (the :meth:`warm_up` size, else the first batch's): smaller
        batches (a slide's last) are zero-padded to it so the compiled graph is reused, and the padding rows
        are dropped.
        """
        x = as_uint8_batch(batch, self.device)
        n = int(x.shape[0])
        if n == 0:
            return torch.empty((0, self.feature_dim), dtype=torch.float32, device=self.device)
        if self.compile:
            if self._compiled_batch is None:
                self._compiled_batch = n
            elif n < self._compiled_batch:
                pad = x.new_zeros((self._compiled_batch - n, *x.shape[1:]))
                x = torch.cat([x, pad], 0)
        inp = preprocess(x, self.input_size, self.spec.mean, self.spec.std)
        with self._autocast():
            out = self._forward(inp)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:n].float()


def benchmark_model(
    encoder: Encoder,
    batch_size: int = 256,
    seconds: float | None = 10.0,
    iters: int | None = None,
    warmup: int = 3,
    input_px: int | None = None,
) -> dict[str, Any]:
    """Model-only throughput on synthetic uint8 input already on the device (preprocess + forward).

    Runs ``warmup`` batches (compilation happens there), then ``iters`` batches or as many as fit in
    ``seconds``. ``input_px`` (default: the model input size) sets the synthetic patch size, e.g. 256 to
    include the on-device resize. Returns ``patches_per_s, device, batch_size, precision, compile`` and more.
    """
    if iters is None and seconds is None:
        raise ValueError("give seconds or iters")
    px = int(input_px or encoder.input_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, px, px, 3), dtype=torch.uint8, generator=gen).to(encoder.device)
    def sync() -> None:  # the encoder's GPU, not the current one (bench model --device cuda:1)
        synchronize(encoder.device)

    t_warm = time.perf_counter()
    for _ in range(max(0, warmup)):
        encoder.embed(batch)
    sync()
    warmup_s = time.perf_counter() - t_warm
    done = 0
    t0 = time.perf_counter()
    while True:
        encoder.embed(batch)
        done += 1
        if iters is not None and done >= iters:
            break
        if iters is None and seconds is not None and done % 2 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    sync()
    elapsed = time.perf_counter() - t0
    dev_name = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "cpu"
    return {
        "patches_per_s": done * batch_size / elapsed if elapsed > 0 else float("nan"),
        "device": str(encoder.device),
        "device_name": dev_name,
        "batch_size": batch_size,
        "precision": encoder.precision,
        "compile": encoder.compile,
        "model": encoder.name,
        "input_px": px,
        "iters": done,
        "seconds": elapsed,
        "warmup_seconds": warmup_s,
        "torch": torch.__version__,
    }
