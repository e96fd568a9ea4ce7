"""`mstar bench model` and `mstar bench extract` with a tiny real timm model (throughput is reported, never asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from mstar_extract.cli import main as cli_main
from mstar_extract.store.bags import validate_bag

TINY = "timm:test_vit"
KEYS = {"patches_per_s", "device", "batch_size", "workers", "precision"}


def bench(*args: str):
    return CliRunner().invoke(cli_main, ["bench", *args], catch_exceptions=False)


def test_bench_model_json_and_line() -> None:
    r = bench("model", "--model", TINY, "--device", "cpu", "--batch-size", "2", "--iters", "2", "--warmup", "1",
              "--input-px", "256", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert KEYS <= set(doc)
    assert doc["benchmark"] == "model" and doc["model"] == TINY and doc["device"] == "cpu"
    assert doc["batch_size"] == 2 and doc["precision"] == "fp32" and doc["workers"] == 0
    assert doc["iters"] == 2 and doc["input_px"] == 256 and doc["patches_per_s"] > 0
    assert "RANDOM weights" in r.stderr  # the default --weights random says so

    r = bench("model", "--model", TINY, "--device", "cpu", "--batch-size", "1", "--iters", "1", "--warmup", "0",
              "--jsonl")
    assert r.exit_code == 0, r.output
    (event,) = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert event["event"] == "bench" and event["batch_size"] == 1 and KEYS <= set(event)

    r = bench("model", "--model", TINY, "--device", "cpu", "--batch-size", "1", "--iters", "1", "--warmup", "0")
    assert r.exit_code == 0 and r.stdout.startswith("model: ") and "patches/s" in r.stdout


def test_bench_model_usage_errors() -> None:
    r = bench("model", "--model", "nope", "--device", "cpu", "--iters", "1")
    assert r.exit_code == 2 and "unknown model 'nope'" in r.stderr and "Traceback" not in r.output
    r = bench("model", "--model", TINY, "--weights", "/no/such/file.pth", "--device", "cpu", "--iters", "1")
    assert r.exit_code == 2 and "/no/such/file.pth" in r.stderr


def test_bench_extract_json(fixture_slides, tmp_path: Path) -> None:
    good, glass = fixture_slides["svs20"].path, fixture_slides["glass_only"].path
    r = bench("extract", str(good), str(glass), "--model", TINY, "--device", "cpu", "--batch-size", "4",
              "--workers", "1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert KEYS <= set(doc) and doc["benchmark"] == "extract"
    assert doc["workers"] == 1 and doc["batch_size"] == 4 and doc["precision"] == "fp32"
    assert doc["n_slides"] == 2 and doc["n_patches"] == 9 and doc["patches_per_s"] > 0
    assert {s["slide_id"]: s["status"] for s in doc["slides"]} == {"svs20": "done", "glass_only": "no_tissue"}
    assert doc["out"] is None  # the temporary OUT is gone

    # --out keeps the outputs; an existing bag is recomputed (a benchmark measures work, never skips it); read in
    # this process (--workers 0: no reader process to start)
    out = tmp_path / "out"
    for _ in range(2):
        r = bench("extract", str(good), "--model", TINY, "--device", "cpu", "--batch-size", "4", "--workers", "0",
                  "--out", str(out), "--json")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["n_patches"] == 9 and doc["slides"][0]["status"] == "done" and doc["out"] == str(out)
    assert validate_bag(out / "features" / "svs20.h5", {"n_patches": 9, "model": TINY}) is None


def test_bench_extract_failed_slide_exit_1(fixture_slides, tmp_path: Path) -> None:
    bad = tmp_path / "text.svs"
    shutil.copy(fixture_slides["broken_text"].path, bad)
    r = bench("extract", str(bad), "--model", TINY, "--device", "cpu", "--batch-size", "2", "--workers", "1")
    assert r.exit_code == 1
    assert r.stdout.startswith("extract: 0.0 patches/s") and "Traceback" not in r.output
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:") and str(bad) in ln]) == 1
