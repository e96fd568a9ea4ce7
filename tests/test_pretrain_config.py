"""Stage-1 config: defaults, YAML, --set coercion, unknown keys, CLI exit codes, docs coverage."""

from __future__ import annotations

from pathlib import Path

import pytest

from mstar_extract.errors import UsageError
from mstar_extract.pretrain.config import apply_overrides, config_reference, dump_yaml, iter_fields, load_config
from mstar_extract.pretrain.stage1.config import Stage1Config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_values() -> None:
    cfg = Stage1Config()
    assert (cfg.aggregator.in_dim, cfg.aggregator.dim, cfg.aggregator.heads, cfg.aggregator.landmarks) == (1024, 512, 8, 256)
    assert cfg.aggregator.dropout == 0.25
    assert cfg.text.model == "dmis-lab/biobert-base-cased-v1.2" and cfg.text.max_tokens == 512
    assert cfg.genes.dim == 200 and cfg.loss.margin == 0.3 and cfg.loss.temperature == 0.07
    assert cfg.data.max_patches == 4096


def test_yaml_and_overrides_coerce_types(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\ntrain:\n  max_steps: 7\n  batch_size: '4'\n")
    cfg = load_config(Stage1Config, p, ["text.trainable_layers=-1", "train.max_steps=null", "loss.learn_temperature=no",
                                        "optim.warmup_steps=1_000", "data.manifest=m.csv"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.batch_size == 4 and cfg.train.max_steps is None
    assert cfg.text.trainable_layers == -1 and cfg.loss.learn_temperature is False
    assert cfg.optim.warmup_steps == 1000 and cfg.data.manifest == "m.csv"
    again = load_config(Stage1Config, None, [])
    assert again.optim.lr == 1e-4 and again.optim.betas == [0.9, 0.999]  # defaults are not shared between instances
    round_trip = tmp_path / "r.yaml"
    round_trip.write_text(dump_yaml(cfg))
    assert load_config(Stage1Config, round_trip) == cfg


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("optim:\n  lrr: 1\n", [], "unknown config key 'optim.lrr'"),
        ("optimiser: {}\n", [], "unknown config key 'optimiser'"),
        ("", ["optim.lr=fast"], "cannot read 'fast' as float"),
        ("", ["train.batch_size=2.5"], "train.batch_size"),
        ("", ["train.precision=fp8"], "not one of"),
        ("", ["data.n_bins"], "expected KEY=VALUE"),
        ("", ["optim=3"], "is a section"),
        ("", ["nope.x=1"], "unknown config key 'nope.x'"),
        ("", ["train.seed=null"], "may not be null"),
        ("optim: 3\n", [], "is a section"),
        ("- a\n- b\n", [], "mapping"),
        ("optim: [\n", [], "not valid YAML"),
    ],
)
def test_config_errors_are_one_line_usage_errors(tmp_path: Path, yaml_text: str, overrides: list[str], message: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(UsageError, match=message) as info:
        load_config(Stage1Config, p, overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config(Stage1Config, tmp_path / "nope.yaml")


def test_apply_overrides_in_place() -> None:
    cfg = Stage1Config()
    apply_overrides(cfg, ["aggregator.landmarks=128"])
    assert cfg.aggregator.landmarks == 128


def _mstar(*args: str):
    """Run the real click command line in-process (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from mstar_extract.cli import main

    r = CliRunner().invoke(main, list(args))
    r.returncode = r.exit_code
    return r


def test_cli_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    r = _mstar("pretrain", "--stage", "1", "--set", "optim.lrr=1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["mstar: error: --set: unknown config key 'optim.lrr' (known in 'optim': lr, weight_decay, betas, eps, "
                     "warmup_steps, min_lr_ratio, grad_clip)"]
    r = _mstar("pretrain", "--stage", "1")
    assert r.returncode == 2 and "data.manifest is required" in r.stderr and "Traceback" not in r.stderr
    r = _mstar("pretrain", "--stage", "1", "--print-config", "--set", "optim.lr=3e-4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "lr: 0.0003" in r.stdout and str(tmp_path / "o") in r.stdout


def test_missing_stage_module_is_usage_error() -> None:
    from mstar_extract.cli.pretrain import _stage_module

    with pytest.raises(UsageError, match="stage 9 is not implemented yet"):
        _stage_module(9)


def test_every_field_is_documented() -> None:
    doc = (REPO / "docs" / "pretrain.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in iter_fields(Stage1Config) if f"`{key}`" not in doc]
    assert not missing, f"docs/pretrain.md lacks {missing}"
    assert config_reference(Stage1Config).count("\n") + 1 == 2 + len(list(iter_fields(Stage1Config)))


def test_example_configs() -> None:
    full = load_config(Stage1Config, REPO / "examples" / "pretrain" / "stage1.yaml")
    defaults = Stage1Config()
    for section in ("aggregator", "text", "genes", "loss", "optim", "train", "dist"):
        assert getattr(full, section) == getattr(defaults, section), section
    tiny = load_config(Stage1Config, REPO / "examples" / "pretrain" / "stage1_tiny.yaml")
    assert tiny.aggregator.in_dim == 64 and tiny.text.local_files_only
