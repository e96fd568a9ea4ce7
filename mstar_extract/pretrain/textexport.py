"""The stage-1 report encoder in the official mSTAR layout (``text_mstar.pth``), and rebuilding it.

mSTAR's zero-shot code (``downstream_task/zeroshot_classification`` of github.com/Innse/mSTAR, last present at
commit 7608e7f) builds ``Text_encoder``: ``text_encoder = AutoModelForMaskedLM(BioBERT)`` and
``proj_text = Linear(768, 512)``; a report embedding is ``proj_text(text_encoder.bert(ids, mask)[0][:, 0])``.
It loads every key of ``checkpoint["model_state_dict"]`` that contains ``text_encoder`` or ``proj_text`` (after
removing ``module.``) with ``strict=False``. Our stage 1 trains the same tower under other names
(:class:`~mstar_extract.pretrain.stage1.text.TextEncoder`: ``text.encoder.*`` = ``AutoModel``, ``text.proj.*``),
so the export renames it:

* ``text_encoder.<key>`` — the full ``AutoModelForMaskedLM`` state: its base model (``bert.*`` for BERT) holds the
  trained encoder (the never-used pooler is dropped: the masked-LM model has none); its masked-LM head
  (``cls.predictions.*``) is what ``AutoModelForMaskedLM.from_config`` initialises (seed 0; tied to the trained
  word embeddings where the model ties them). The head was never trained and zero-shot never uses it; it is
  there so the official ``strict=False`` load reports no missing keys.
* ``proj_text.weight`` / ``proj_text.bias`` — the trained projection.

The file also carries what our own zero-shot needs to rebuild the tower offline, as plain data (it loads with
``torch.load(weights_only=True)``): ``text`` = {``model`` (the name stage 1 was given), ``config`` (the
transformers config as a dict), ``tokenizer_files`` (the tokenizer's saved files: text as strings, binary as
uint8 tensors), ``max_tokens``, ``pooling``, ``embed_dim``}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mstar_extract.errors import MstarError, UsageError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from mstar_extract.pretrain.stage1.text import TextEncoder

TEXT_FORMAT = "mstar-stage1-text"
TEXT_PREFIX = "text_encoder."
PROJ_TEXT_PREFIX = "proj_text."


def mlm_from_config(values: dict[str, Any]) -> PreTrainedModel:
    """A freshly initialised ``AutoModelForMaskedLM`` of this config (seed 0, no download)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from mstar_extract.pretrain.stage1.text import _quiet_transformers

    _quiet_transformers()
    values = dict(values)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise MstarError("text config has no model_type")
    config = AutoConfig.for_model(model_type, **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForMaskedLM.from_config(config)


def base_model(mlm: PreTrainedModel) -> torch.nn.Module:
    """The encoder inside a masked-LM model (``mlm.bert`` for BERT)."""
    return getattr(mlm, mlm.base_model_prefix)


def config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as plain JSON data."""
    return json.loads(config.to_json_string(use_diff=False))


def official_text_state(text: TextEncoder) -> dict[str, torch.Tensor]:
    """``text_encoder.*`` (``AutoModelForMaskedLM`` names) and ``proj_text.*`` of a trained report encoder."""
    mlm = mlm_from_config(config_dict(text.encoder.config))
    base = base_model(mlm)
    ours = text.encoder.state_dict()
    wanted = base.state_dict()
    missing = [k for k in wanted if k not in ours]
    if missing:
        raise MstarError(f"text encoder: the masked-LM layout needs {', '.join(missing[:3])}, which the trained "
                         "encoder lacks")
    base.load_state_dict({k: ours[k] for k in wanted}, strict=True)
    state = {TEXT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in mlm.state_dict().items()}
    state.update({PROJ_TEXT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous().clone()
                  for k, v in text.proj.state_dict().items()})
    return state


def tokenizer_files(tokenizer: Any) -> dict[str, Any]:
    """The files ``tokenizer.save_pretrained`` writes: text files as strings, binary ones as uint8 tensors."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mstar-tok-") as d:
        tokenizer.save_pretrained(d)
        for p in sorted(Path(d).iterdir()):
            if not p.is_file():
                continue
            data = p.read_bytes()
            try:
                out[p.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                out[p.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return out


def load_tokenizer_files(files: dict[str, Any], where: str) -> Any:
    """An ``AutoTokenizer`` from :func:`tokenizer_files`' output (written to a temporary folder and read back)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mstar-tok-") as d:
        for name, data in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise MstarError(f"{where}: bad tokenizer file name {name!r}")
            target = Path(d) / name
            if isinstance(data, str):
                target.write_text(data, encoding="utf-8")
            else:
                target.write_bytes(bytes(data.to(torch.uint8).numpy().tobytes()))
        try:
            return AutoTokenizer.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MstarError(f"{where}: cannot rebuild the tokenizer ({first_line(exc)})") from None


def text_meta(text: TextEncoder, tokenizer: Any, model_name: str, max_tokens: int) -> dict[str, Any]:
    """The ``text`` entry of a text export (see the module docstring)."""
    return {
        "model": str(model_name),
        "config": config_dict(text.encoder.config),
        "tokenizer_files": tokenizer_files(tokenizer),
        "max_tokens": int(max_tokens),
        "pooling": text.pooling,
        "hidden_size": int(text.proj.in_features),
        "embed_dim": int(text.proj.out_features),
    }


def text_export(text: TextEncoder, tokenizer: Any, model_name: str, max_tokens: int,
                meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``text_mstar.pth``."""
    return {"format": TEXT_FORMAT, "version": 1, "model_state_dict": official_text_state(text),
            "text": text_meta(text, tokenizer, model_name, max_tokens), "meta": dict(meta or {})}


def write_text_export(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write a text export atomically."""
    from mstar_extract.store.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def check_text_export(obj: Any, where: str) -> dict[str, Any]:
    """``obj`` when it is a text export (or a zero-shot checkpoint) with every key our zero-shot needs."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model_state_dict"), dict):
        raise MstarError(f"{where}: no model_state_dict: not an mSTAR text or zero-shot checkpoint")
    sd = obj["model_state_dict"]
    if not any(k.startswith(TEXT_PREFIX) for k in sd) or PROJ_TEXT_PREFIX + "weight" not in sd:
        raise MstarError(f"{where}: model_state_dict has no text_encoder.* / proj_text.* keys")
    text = obj.get("text")
    if not isinstance(text, dict) or not {"config", "tokenizer_files", "max_tokens", "pooling"} <= set(text):
        raise MstarError(f"{where}: no 'text' record (config, tokenizer, max_tokens, pooling); files written by "
                         "`mstar pretrain` carry one")
    return obj


def load_text_export(path: str | Path) -> dict[str, Any]:
    """Read ``text_mstar.pth`` (``weights_only=True``) and check it."""
    from mstar_extract.pretrain.checkpoint import load_torch_file

    return check_text_export(load_torch_file(path, "text export"), str(path))


def text_export_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The text export of a stage-1 run folder: its ``text_mstar.pth`` (the name in its config), or, for a run
    trained before that file existed, rebuilt from its newest checkpoint and ``config.yaml``."""
    from mstar_extract.pretrain.checkpoint import latest_checkpoint, load_checkpoint
    from mstar_extract.pretrain.config import load_config
    from mstar_extract.pretrain.stage1.config import Stage1Config
    from mstar_extract.pretrain.stage1.text import TextEncoder, load_tokenizer

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UsageError(f"{run}: not a stage-1 run folder (no config.yaml)")
    cfg = load_config(Stage1Config, run / "config.yaml")
    exported = run / cfg.export.text
    if exported.is_file():
        return load_text_export(exported)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UsageError(f"{run}: neither {cfg.export.text} nor a checkpoint to rebuild it from")
    state = load_checkpoint(ckpt)["model"]
    t = cfg.text
    text = TextEncoder(t.model, cfg.aggregator.dim, 0, False, t.local_files_only, t.pooling)
    own = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    try:
        text.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise MstarError(f"{ckpt}: text weights do not fit text.model {t.model!r} ({first_line(exc)})") from None
    return text_export(text, load_tokenizer(t.model, t.local_files_only), t.model, t.max_tokens,
                       {"from_checkpoint": str(ckpt)})
