"""Dataclass configurations: documented defaults, YAML loading, ``--set a.b=value`` overrides, YAML dump.

Every field is declared with :func:`opt`, which records a one-line help text (and optional choices) in the
field metadata; :func:`config_reference` turns that into the table in ``docs/pretrain.md``. The helpers are
generic (any nested dataclass tree), so stage 2 declares its own root dataclass and reuses
:func:`load_config`, :func:`apply_overrides`, :func:`config_to_dict` and :func:`save_config`.

Rules: unknown keys (in the file or in ``--set``) are a :class:`~mstar_extract.errors.UsageError` naming the
key and the known ones; values are coerced to the declared field type (``"1e-4"`` → float, ``"yes"`` → bool,
``"null"`` → None for optional fields); a value that cannot be coerced is a UsageError too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, Union

from mstar_extract.errors import UsageError

T = TypeVar("T")


def opt(default: Any, help: str, choices: Iterable[Any] | None = None, source: str = "ours") -> Any:
    """A dataclass field with a default and documentation.

    ``source`` is ``"paper"`` when the value is what is known of mSTAR's paper, ``"ours"`` when the paper is
    silent and the value is this project's choice.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "source": source}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested-dataclass field (a config section)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


# --------------------------------------------------------------------------------------------- coercion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - built at run time from a tuple
    return False, tp


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to type ``tp``; UsageError naming ``key`` if impossible."""
    optional, inner = _is_optional(tp)
    is_null_word = isinstance(value, str) and value.strip().lower() in ("null", "none", "~")
    if value is None or (is_null_word and (optional or inner is not str)):
        if optional:
            return None
        raise UsageError(f"config key '{key}' may not be null")
    tp = inner
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).strip().replace("_", ""))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            if isinstance(value, str):
                import yaml

                parsed = yaml.safe_load(value)
                value = parsed if isinstance(parsed, list) else [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return [coerce(v, item_tp, key) if item_tp is not Any else v for v in value]
        if tp is Any:
            return value
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UsageError(f"config key '{key}': cannot read {value!r} as {name}") from None
    return value


# --------------------------------------------------------------------------------------------- dict <-> dataclass


def _fields(cls: Any) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def _section_type(tp: Any) -> type:
    """The dataclass type of a nested config section's annotation."""
    return tp if isinstance(tp, type) else type(tp)


def _known(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, coercing types; unknown keys are a UsageError."""
    data = dict(data or {})  # callers pass a mapping (load_config and the section check below ensure it)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in _fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise UsageError(f"config key '{key}' is a section; give a mapping, not {value!r}")
            kwargs[f.name] = from_dict(_section_type(tp), value, key + ".")
        else:
            kwargs[f.name] = coerce(value, tp, key)
    if data:
        bad = sorted(data)[0]
        raise UsageError(
            f"unknown config key '{prefix}{bad}' (known in '{prefix.rstrip('.') or '<root>'}': {', '.join(_known(cls))})"
        )
    obj = cls(**kwargs)
    _check_choices(obj, prefix)
    return obj


def _check_choices(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise UsageError(
                f"config key '{prefix}{f.name}': {getattr(obj, f.name)!r} is not one of {', '.join(map(str, choices))}"
            )


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (what is saved in the run folder and in checkpoints)."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], str]:
    """``"optim.lr=1e-4"`` → (["optim", "lr"], "1e-4")."""
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise UsageError(f"--set {text!r}: bad key {key!r}")
    return parts, value


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply ``--set a.b=value`` strings to a config in place (type-coerced); returns it."""
    for text in overrides:
        parts, raw = parse_override(text)
        obj: Any = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in _known(type(obj)):
                where = ".".join(parts[:i]) or "<root>"
                known = ", ".join(_known(type(obj))) if dataclasses.is_dataclass(obj) else ""
                raise UsageError(f"--set: unknown config key '{'.'.join(parts)}' (known in '{where}': {known})")
            if i == len(parts) - 1:
                tp = _hints(type(obj))[part]
                if dataclasses.is_dataclass(tp):
                    raise UsageError(f"--set: '{'.'.join(parts)}' is a section; set one of its keys")
                setattr(obj, part, coerce(raw, tp, ".".join(parts)))
                _check_choices(obj, ".".join(parts[:-1]) + ("." if len(parts) > 1 else ""))
            else:
                obj = getattr(obj, part)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of ``cls``, updated from YAML file ``path`` (if given), then from ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UsageError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UsageError(f"{p}: the config must be a mapping of sections")
        data = loaded
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides)


def dump_yaml(obj: Any) -> str:
    """The config as YAML (sections in declaration order)."""
    import yaml

    return yaml.safe_dump(config_to_dict(obj), sort_keys=False, default_flow_style=False)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config atomically (``config.yaml`` in the run folder)."""
    from mstar_extract.store.atomic import write_text_atomic

    write_text_atomic(path, dump_yaml(obj))


def iter_fields(cls: type, prefix: str = "") -> Iterable[tuple[str, Any, dict[str, Any]]]:
    """(dotted key, default, metadata) for every leaf field of a config tree."""
    hints = _hints(cls)
    inst = cls()
    for f in _fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(_section_type(tp), prefix + f.name + ".")
        else:
            yield prefix + f.name, getattr(inst, f.name), dict(f.metadata)


def config_reference(cls: type) -> str:
    """A Markdown table of every field: key, default, source (paper/ours), help."""
    rows = ["| key | default | from | meaning |", "|---|---|---|---|"]
    for key, default, meta in iter_fields(cls):
        d = "null" if default is None else repr(default) if isinstance(default, str) else str(default)
        if isinstance(default, bool):
            d = str(default).lower()
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" One of: {', '.join(map(str, meta['choices']))}."
        rows.append(f"| `{key}` | `{d}` | {meta.get('source', 'ours')} | {help_text} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- shared sections
# Reused by both stages (stage 2 embeds them in its own root dataclass).


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (per optimisation step)."""

    lr: float = opt(1e-4, "Peak learning rate (after warm-up) for the trained modules.")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases, norms, embeddings, temperatures).")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    warmup_steps: int = opt(200, "Linear warm-up steps from 0 to `lr`.")
    min_lr_ratio: float = opt(0.01, "Cosine decay ends at `lr * min_lr_ratio`.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 = off).")


@dataclasses.dataclass
class TrainConfig:
    """Loop length, batch, precision, logging and checkpoint cadence."""

    epochs: int = opt(50, "Passes over the training split.")
    max_steps: int | None = opt(None, "Stop after this many optimisation steps in total (null = epochs decide).")
    stop_after_steps: int | None = opt(None, "Leave (with a checkpoint) after this many steps of this invocation; "
                                             "the schedule still spans the whole run. For wall-time-limited jobs: "
                                             "resume with --resume auto.")
    batch_size: int = opt(16, "Slides per process per step (global batch = batch_size × world size).")
    precision: str = opt("auto", "auto = bf16 autocast on GPUs with bf16 hardware (compute capability >= 8.0), "
                                 "fp16 with a GradScaler on older GPUs (V100, T4), fp32 on CPU.",
                         choices=("auto", "bf16", "fp16", "fp32"))
    seed: int = opt(0, "Seed of model init, shuffling and patch sampling (identical on every rank).")
    num_workers: int = opt(4, "DataLoader worker processes per rank.")
    cpu_threads: int | None = opt(None, "torch intra-op threads per process when training on CPU (null = torch's default). "
                                        "1 is fastest for tiny models on a busy machine.")
    log_every: int = opt(10, "Write a metrics line every N steps.")
    ckpt_every: int = opt(500, "Write a checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = opt(3, "Keep only the newest N step checkpoints (0 = keep all).")
    val_every: int = opt(1, "Validate every N epochs (0 = never).")


@dataclasses.dataclass
class DistConfig:
    """torch.distributed settings (the process layout itself comes from torchrun's environment)."""

    backend: str = opt("auto", "auto = nccl with CUDA, gloo on CPU.", choices=("auto", "nccl", "gloo"))
    device: str = opt("auto", "auto = cuda:LOCAL_RANK when CUDA is available, else cpu; or cpu / cuda / cuda:N.")
    find_unused_parameters: bool = opt(False, "Passed to DistributedDataParallel.")
    timeout_s: int = opt(1800, "Collective-operation timeout in seconds.")


@dataclasses.dataclass
class RunConfig:
    """Where the run lives."""

    out_dir: str = opt("runs/stage1", "Run folder: config.yaml, metrics.jsonl, checkpoints/, exports (--out overrides).")
