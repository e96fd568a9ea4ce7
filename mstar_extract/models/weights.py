"""Resolve ``--weights PATH|hf|random``: find the file, checksum it, read the state dict, load it strictly.

Decisions (documented in docs/models.md):

* A PATH is ``.safetensors`` (read with safetensors) or a torch file (``.pth``/``.pt``/``.bin``/other, read
  with ``torch.load(weights_only=True)`` only — a pickle holding arbitrary objects is refused).
* Containers: when the file holds a dict without tensors at its top level, a nested state dict under
  ``state_dict``, ``model`` or ``model_state_dict`` is taken (the usual training checkpoints). When *every*
  key starts with ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile) that prefix is
  stripped. Nothing else is renamed: the load is ``strict=True`` and a mismatch is a :class:`WeightsError`.
* ``hf`` takes the registry file from the hub cache when it is there (no network), else downloads it from
  the Hugging Face hub (token from ``HF_TOKEN`` or a saved login; cache = ``cache_dir`` argument, else
  ``MSTAR_CACHE``, else the huggingface_hub default cache); ``HF_HUB_OFFLINE=1`` never touches the network.
  Every refusal becomes one line naming the two ways in.
* ``random`` keeps timm's random initialisation (a loud warning; sha256 ``"random"``).
* The sha256 of a weights file is cached in the tool's cache folder, never beside the user's file (which may be
  in a read-only or shared folder, or a folder the user did not ask us to write to): one small entry per file in
  :func:`sha256_cache_dir`, keyed by the file's absolute path, holding the digest with the file's size and
  mtime; it is reused only while size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar_extract.errors import WeightsError, first_line
from mstar_extract.models.registry import EncoderSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("mstar")

RANDOM_SHA256 = "random"
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class ResolvedWeights:
    """Where the weights of one encoder come from."""

    source: str
    """``path``, ``hf`` or ``random``."""
    path: Path | None
    """The local file (``None`` for random)."""
    sha256: str
    """Hex sha256 of the file, or ``"random"``."""

    @property
    def description(self) -> str:
        return "random initialisation" if self.path is None else str(self.path)


# --------------------------------------------------------------------------------------------------- sha256


def sha256_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where sha256 digests are cached: ``$MSTAR_CACHE/sha256`` when set; else ``weights/.cache/sha256`` of the
    checkout mstar runs from (git-ignored); else ``$XDG_CACHE_HOME/mstar/sha256`` (``~/.cache/mstar/sha256``).

    Not inside the Hugging Face hub cache itself (its ``scan-cache`` would list a foreign folder as corrupt)."""
    from mstar_extract.envdefaults import weights_cache

    env = os.environ if env is None else env
    cache = weights_cache(env)
    if cache.source == "env":
        return cache.path / "sha256"
    if cache.source == "checkout":
        return cache.path / ".cache" / "sha256"
    xdg = (env.get("XDG_CACHE_HOME") or "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.expanduser(xdg)) / "mstar" / "sha256"


def _cache_entry(path: Path, cache_dir: Path) -> Path:
    """The cache file of ``path``: named by a hash of its absolute path (one entry per file, overwritten when the
    file changes)."""
    key = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir / f"{key}.sha256"


def _entry_text(path: Path, digest: str, size: int, mtime_ns: int) -> str:
    return f"{digest}  {path.resolve()}\n# size={size} mtime_ns={mtime_ns}\n"


def _read_cached(entry: Path, path: Path, size: int, mtime_ns: int) -> str | None:
    try:
        lines = entry.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 2 or lines[1].strip() != f"# size={size} mtime_ns={mtime_ns}":
        return None
    digest, _, named = lines[0].partition("  ")
    if named != str(path.resolve()):
        return None
    return digest.lower() if len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest) else None


def sha256_file(path: str | os.PathLike[str], use_cache: bool = True, chunk_bytes: int = 8 << 20,
                cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Hex sha256 of a file, streamed; cached in :func:`sha256_cache_dir` (or ``cache_dir``) keyed by the
    file's path, size and mtime. Nothing is ever written beside the file.

    A cache folder that cannot be written is silently skipped (the digest is then computed every time).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file ({exc.strerror or exc})") from None
    entry = _cache_entry(path, Path(cache_dir) if cache_dir is not None else sha256_cache_dir()) if use_cache else None
    if entry is not None:
        cached = _read_cached(entry, path, st.st_size, st.st_mtime_ns)
        if cached:
            return cached
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while True:
                block = fh.read(chunk_bytes)
                if not block:
                    break
                h.update(block)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file ({exc.strerror or exc})") from None
    digest = h.hexdigest()
    if entry is not None:
        try:
            from mstar_extract.store.atomic import write_text_atomic

            entry.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(entry, _entry_text(path, digest, st.st_size, st.st_mtime_ns))
        except OSError as exc:
            log.debug("could not cache the sha256 of %s in %s: %s", path, entry.parent, exc)
    return digest


# ------------------------------------------------------------------------------------------- state dicts


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        return False
    try:  # sniff: 8-byte little-endian header length, then a JSON object
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)")
    if obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                log.info("%s: using the state dict under %r", path, key)
                return _unwrap(obj[key], path)
        raise WeightsError(
            f"{path}: no tensors at the top level and no {'/'.join(CONTAINER_KEYS)} entry "
            f"(keys: {', '.join(map(str, list(obj)[:6]))})"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``), on the CPU.

    ``mmap=True`` maps a (zip-format) torch file instead of reading it (copy-on-write; much faster for a
    1.2 GB ViT-L); legacy-format files are then read normally.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: weights file is empty")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path), device="cpu"), path)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise WeightsError(f"{path}: not a readable .safetensors file ({_first_line(exc)})") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused to unpickle (torch.load weights_only=True allows tensors and plain containers only; "
            f"save a plain state dict or .safetensors): {_first_line(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise WeightsError(f"{path}: not a readable weights file ({type(exc).__name__}: {_first_line(exc)})") from None
    return _unwrap(obj, path)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    line = first_line(exc)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def load_into(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    spec: EncoderSpec,
    source: object,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``model`` with ``strict=True``; any mismatch is one-line :class:`WeightsError`.

    Tensors are cast to the model's dtypes (a float16 file gives a float32 model). ``assign=True`` adopts
    the tensors instead of copying them (for a model built on the ``meta`` device).
    """
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in spec.ignore_keys)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es), e.g. {k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
            )
        raise WeightsError(
            f"{source}: does not fit model {spec.name!r} ({spec.architecture}); " + "; ".join(parts)
        )
    sd = {k: (v.to(own[k].dtype) if v.dtype != own[k].dtype else v) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=assign)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: does not load into {spec.name!r}: {_first_line(exc)}") from None


# ------------------------------------------------------------------------------------------ Hugging Face


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The hub cache to use: ``cache_dir``, else ``$MSTAR_CACHE``, else the checkout's ``weights/`` when running
    from a git checkout, else ``None`` (huggingface_hub's default cache; see :mod:`mstar_extract.envdefaults`)."""
    if cache_dir:
        return str(cache_dir)
    from mstar_extract.envdefaults import weights_cache

    cache = weights_cache()
    return None if cache.source == "hf" else str(cache.path)


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (read now, not at import time)."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE


def _ways_in(spec: EncoderSpec) -> str:
    if spec.gated:
        first = (
            f"request access at {spec.hub_url}, then set HF_TOKEN or log in (`hf auth login`; older: `huggingface-cli login`)"
        )
    else:
        first = f"check the repository {spec.hub_url} and your network/HF_TOKEN"
    return f"Two ways in: (1) {first}; or (2) pass --weights PATH to a local {spec.hub_filename or 'state dict'}."


def hub_error(exc: BaseException, spec: EncoderSpec, offline: bool) -> WeightsError:
    """Translate a huggingface_hub/network exception into one actionable line."""
    from huggingface_hub import errors as hf

    what = f"cannot get the {spec.name} weights ({spec.hub_repo}/{spec.hub_filename})"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.GatedRepoError):
        why = "access to this gated repository has not been granted to your token" if status != 401 else (
            "this gated repository needs a Hugging Face token (none or an invalid one was sent)"
        )
    elif isinstance(exc, hf.RepositoryNotFoundError):
        why = (
            f"the hub answered {status or 'not found'}: the repository is gated/private and no valid token was "
            "sent, or it does not exist"
        )
    elif isinstance(exc, (hf.RemoteEntryNotFoundError,)) or (
        isinstance(exc, hf.EntryNotFoundError) and not isinstance(exc, hf.LocalEntryNotFoundError)
    ):
        why = f"the repository has no file {spec.hub_filename!r}"
    elif isinstance(exc, hf.LocalEntryNotFoundError) or offline:
        why = (
            "offline (HF_HUB_OFFLINE=1) and the file is not in the cache"
            if offline
            else "the hub could not be reached (no network?) and the file is not in the cache"
        )
    elif isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        why = f"the hub refused access ({status}); your token lacks permission for this repository"
    else:
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    return WeightsError(f"{what}: {why}. {_ways_in(spec)}")


def hub_download(
    spec: EncoderSpec,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Path:
    """Fetch ``spec``'s weights file (or find it in the cache when offline); return the local path."""
    if not spec.hub_repo or not spec.hub_filename:
        raise WeightsError(f"no hub weights are known for model {spec.name!r}; pass --weights PATH")
    from huggingface_hub import hf_hub_download

    offline = offline_mode()
    kw: dict[str, Any] = {}
    if endpoint or os.environ.get("HF_ENDPOINT"):
        kw["endpoint"] = endpoint or os.environ["HF_ENDPOINT"]
    hf_log = logging.getLogger("huggingface_hub")
    old_level = hf_log.level
    if not log.isEnabledFor(logging.DEBUG):  # its retry warnings would bury our one-line message
        hf_log.setLevel(logging.ERROR)
    try:
        path = hf_hub_download(
            spec.hub_repo,
            spec.hub_filename,
            cache_dir=default_cache_dir(cache_dir) if local_dir is None else None,
            local_dir=str(local_dir) if local_dir is not None else None,
            token=token,
            local_files_only=offline,
            **kw,
        )
    except Exception as exc:  # noqa: BLE001 - every hub/network failure becomes one line
        raise hub_error(exc, spec, offline) from None
    finally:
        hf_log.setLevel(old_level)
    return Path(path)


def cached_hub_file(spec: EncoderSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached weights file of ``spec`` if present (no network), else ``None``."""
    if not spec.hub_repo or not spec.hub_filename:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.hub_repo, spec.hub_filename, cache_dir=default_cache_dir(cache_dir))
    return Path(found) if isinstance(found, str) else None


# -------------------------------------------------------------------------------------------- resolution


def random_warning(spec: EncoderSpec) -> str:
    """The one line that ``--weights random`` prints."""
    return (f"warning: --weights random: model {spec.name!r} has RANDOM weights, the features are MEANINGLESS "
            f"(smoke tests only; bags record weights_sha256='random')")


def warn_random(spec: EncoderSpec, stream: Any = None) -> None:
    """Say in one stderr line that ``--weights random`` makes meaningless features: through the ``mstar`` logger
    (so ``-q`` silences it), or on ``stream`` when one is given."""
    if stream is None:
        log.warning(random_warning(spec))
        return
    stream.write(f"mstar: {random_warning(spec)}\n")
    stream.flush()


def resolve_weights(
    spec: EncoderSpec,
    weights: str | os.PathLike[str] | None = "hf",
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    warn_stream: Any = None,
) -> ResolvedWeights:
    """Turn ``--weights`` into a local file + sha256 (or random), before any slide is touched."""
    value = "hf" if weights is None else str(weights)
    if value == "random":
        warn_random(spec, warn_stream)
        return ResolvedWeights("random", None, RANDOM_SHA256)
    if value == "hf":
        # A cached file is used as is, without asking the hub (compute nodes often have no network, and
        # huggingface_hub would retry for ~25 s before falling back); `mstar weights download` refreshes it.
        path = cached_hub_file(spec, cache_dir) or hub_download(spec, cache_dir=cache_dir, token=token)
        return ResolvedWeights("hf", path, sha256_file(path))
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found (--weights takes a .pth/.bin/.safetensors file, 'hf' or 'random')"
        )
    return ResolvedWeights("path", path, sha256_file(path))


def build_with_weights(spec: EncoderSpec, resolved: ResolvedWeights) -> torch.nn.Module:
    """The network of ``spec`` holding the resolved weights, in eval mode on the CPU.

    With a weights file the network is built on the ``meta`` device (no random initialisation of 300 M
    parameters) and adopts the loaded tensors; should anything stay on ``meta`` (a non-persistent buffer),
    it is rebuilt normally and the weights are copied in.
    """
    import itertools

    import torch

    if resolved.path is None:
        # random weights: the same seeded network in every process (--devices, torchrun ranks, reruns), so that
        # one OUT of a smoke test never mixes features of different random networks
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return spec.build().eval()
    sd = load_state_dict_file(resolved.path, mmap=True)
    with torch.device("meta"):
        net = spec.build()
    load_into(net, sd, spec, resolved.path, assign=True)
    if any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
        net = spec.build()
        load_into(net, sd, spec, resolved.path)
    return net.eval()
