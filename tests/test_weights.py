"""Weights: local files (.pth/.bin/.safetensors) loaded strict, checksums, the hub cache, hub refusals, CLI.

No network is used. The hub tests talk to a small HTTP server on 127.0.0.1 that answers the two requests
``hf_hub_download`` makes (HEAD/GET ``/<repo>/resolve/<rev>/<file>``) the way huggingface.co does, including
its ``X-Error-Code`` headers for gated and missing repositories, so the real huggingface_hub client, cache
layout and error classes are exercised end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mstar_extract.cli import main as cli_main
from mstar_extract.errors import WeightsError
from mstar_extract.models.encoder import Encoder
from mstar_extract.models.registry import get_spec
from mstar_extract.models.weights import (
    RANDOM_SHA256,
    hub_download,
    load_state_dict_file,
    resolve_weights,
    sha256_cache_dir,
    sha256_file,
)
from mstar_extract.testing.cli import run_mstar

TINY = "timm:vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[1]


class NotAllowed:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_spec(TINY).build()


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=g)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 600
    return text


# ----------------------------------------------------------------------------------------------- local files


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_state_dict_files_load_strict(tmp_path: Path, tiny: torch.nn.Module, suffix: str) -> None:
    path = tmp_path / f"tiny{suffix}"
    sd = tiny.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    enc = Encoder.create(TINY, weights=str(path), device="cpu")
    assert enc.weights.source == "path" and enc.weights.path == path
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    ref = Encoder(enc.spec, tiny, enc.weights, torch.device("cpu"), "fp32")
    torch.testing.assert_close(enc.embed(_x()), ref.embed(_x()))


def test_containers_prefixes_and_half_precision(tmp_path: Path, tiny: torch.nn.Module) -> None:
    sd = tiny.state_dict()
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    loaded = load_state_dict_file(wrapped)
    assert set(loaded) == set(sd)
    half = tmp_path / "half.pth"
    torch.save({"model": {k: v.half() for k, v in sd.items()}}, half)
    enc = Encoder.create(TINY, weights=str(half), device="cpu")
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    nothing = tmp_path / "nothing.pth"
    torch.save({"epoch": 3, "lr": 0.1}, nothing)
    with pytest.raises(WeightsError, match="no tensors at the top level") as exc:
        load_state_dict_file(nothing)
    _one_line(exc)


def test_mismatched_keys_are_one_clear_line(tmp_path: Path, tiny: torch.nn.Module) -> None:
    sd = dict(tiny.state_dict())
    del sd["blocks.0.norm1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as exc:
        Encoder.create(TINY, weights=str(path), device="cpu")
    text = _one_line(exc)
    assert str(path) in text and "1 missing key(s): blocks.0.norm1.weight" in text
    assert "1 unexpected key(s): extra.weight" in text
    # a ViT-S state dict into the ViT-Ti architecture: shapes differ
    small = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in get_spec("timm:vit_small_patch16_224").build().state_dict().items()}, str(small))
    with pytest.raises(WeightsError, match="shape mismatch") as exc:
        Encoder.create(TINY, weights=str(small), device="cpu")
    _one_line(exc)


def test_pickles_with_arbitrary_objects_are_refused(tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny.state_dict(), "config": NotAllowed()}, path)
    with pytest.raises(WeightsError, match="refused to unpickle") as exc:
        load_state_dict_file(path)
    assert "weights_only=True" in _one_line(exc)


def test_unreadable_files(tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = tmp_path / "cut.pth"
    torch.save(tiny.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable weights file") as exc:
        load_state_dict_file(path)
    _one_line(exc)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict_file(empty)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_state_dict_file(junk)
    with pytest.raises(WeightsError, match="weights file not found") as exc:
        resolve_weights(get_spec(TINY), str(tmp_path / "absent.pth"))
    assert "'hf' or 'random'" in _one_line(exc)


def test_random_weights_warn_in_one_line() -> None:
    import io

    stream = io.StringIO()
    resolved = resolve_weights(get_spec("mstar"), "random", warn_stream=stream)
    assert resolved.sha256 == RANDOM_SHA256 and resolved.path is None
    err = stream.getvalue()
    assert "RANDOM weights" in err and "MEANINGLESS" in err and "smoke tests" in err
    assert err.count("\n") == 1 and err.startswith("mstar: warning:")  # one line, not a banner (issue 12)


def test_sha256_cache_is_reused_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSTAR_CACHE", str(cache))
    assert sha256_cache_dir() == cache / "sha256"
    path = tmp_path / "user" / "w.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * 100_000)
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == real
    (entry,) = list((cache / "sha256").iterdir())
    lines = entry.read_text().splitlines()
    assert lines[0] == f"{real}  {path.resolve()}" and lines[1].startswith("# size=100000 mtime_ns=")
    fake = "0" * 64  # prove the cached value is used: plant a different digest with the same key
    entry.write_text(f"{fake}  {path.resolve()}\n{lines[1]}\n")
    assert sha256_file(path) == fake
    path.write_bytes(b"y" * 100_000)
    os.utime(path, ns=(1, 10**18))
    assert sha256_file(path) == hashlib.sha256(b"y" * 100_000).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["w.bin"]  # nothing beside the user's file
    # sha256sum understands the cache entry (absolute path)
    if Path("/usr/bin/sha256sum").exists():
        res = subprocess.run(["sha256sum", "-c", str(entry)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_naming_weights_writes_nothing_beside_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    """A weights file in someone else's folder (read-only here) or in a writable folder: naming it with
    --weights, even when it is refused, leaves that folder exactly as it was; the digest goes to the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSTAR_CACHE", str(cache))
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir()
    other.mkdir()
    good = shared / "w.pth"
    torch.save(tiny.state_dict(), good)
    refused = other / "bad.pth"
    torch.save({"x": NotAllowed()}, refused)
    wrong = other / "wrong.pth"
    torch.save({"not": torch.zeros(2)}, wrong)
    before = {d: sorted(p.name for p in d.iterdir()) for d in (shared, other)}
    shared.chmod(0o555)
    try:
        res = CliRunner().invoke(cli_main, ["weights", "verify", str(good), "--model", TINY])
        assert res.exit_code == 0, res.output
        for bad in (refused, wrong):
            with pytest.raises(WeightsError):
                Encoder.create(TINY, weights=str(bad), device="cpu")
    finally:
        shared.chmod(0o755)
    assert {d: sorted(p.name for p in d.iterdir()) for d in (shared, other)} == before
    cached = sorted(p.read_text().split()[1] for p in (cache / "sha256").iterdir())
    assert cached == sorted(str(p.resolve()) for p in (good, refused, wrong))


# ------------------------------------------------------------------------------------------------ hub cache


def _populate_cache(cache: Path, repo: str, filename: str, data: bytes, rev: str = "c0ffee" * 6 + "abcd") -> Path:
    """Write ``data`` into ``cache`` exactly as huggingface_hub lays out a downloaded file."""
    root = cache / ("models--" + repo.replace("/", "--"))
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = root / "snapshots" / rev / filename
    snap.parent.mkdir(parents=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snap


def test_offline_empty_cache_gives_the_two_ways_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MSTAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as exc:
        resolve_weights(get_spec("mstar"), "hf")
    text = _one_line(exc)
    assert "offline (HF_HUB_OFFLINE=1)" in text
    assert "https://huggingface.co/Wangyh/mSTAR" in text and "HF_TOKEN" in text and "huggingface-cli login" in text
    assert "--weights PATH" in text


def test_offline_cache_hit_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: torch.nn.Module) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    snap = _populate_cache(cache, "Wangyh/mSTAR", "mSTAR.pth", b"pretend weights")
    monkeypatch.setenv("MSTAR_CACHE", str(cache))
    resolved = resolve_weights(get_spec("mstar"), "hf")
    assert resolved.source == "hf" and resolved.path == snap
    assert resolved.sha256 == hashlib.sha256(b"pretend weights").hexdigest()
    monkeypatch.delenv("MSTAR_CACHE")
    # a timm model from its own hub repo in an explicit cache dir: the classifier keys are dropped
    import timm

    spec = get_spec(TINY)

    with_head = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    with_head.load_state_dict({**tiny.state_dict(), **{k: v for k, v in with_head.state_dict().items() if k.startswith("head.")}})
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in with_head.state_dict().items()}, str(st))
    _populate_cache(tmp_path / "c2", spec.hub_repo, "model.safetensors", st.read_bytes())
    enc = Encoder.create(TINY, weights="hf", device="cpu", cache_dir=tmp_path / "c2")
    ref = Encoder(spec, tiny, enc.weights, torch.device("cpu"), "fp32")
    torch.testing.assert_close(enc.embed(_x()), ref.embed(_x()))


# ------------------------------------------------------------------------------------------ hub over HTTP

GOOD_TOKEN = "hf_test_granted_token"
PAYLOAD = b"mstar weights stand-in " * 1000
COMMIT = "1234567890abcdef1234567890abcdef12345678"


class _Hub(BaseHTTPRequestHandler):
    files = {("Wangyh/mSTAR", "mSTAR.pth"): PAYLOAD}
    gated = {"Wangyh/mSTAR"}

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", "no such route")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if not any(r == repo for r, _ in self.files):
            return self._error(401, "RepoNotFound", "Repository not found")
        auth = self.headers.get("Authorization", "")
        if repo in self.gated and auth != f"Bearer {GOOD_TOKEN}":
            status = 401 if not auth else 403
            return self._error(status, "GatedRepo", f"Access to model {repo} is restricted.")
        data = self.files.get((repo, filename))
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(payload)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


@pytest.fixture(scope="module")
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), MSTAR_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", **extra)
    return env


def _mstar(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_mstar(*args, env=env, timeout=120)


def test_gated_refusals_are_one_line(tmp_path: Path, hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    spec = get_spec("mstar")
    for token, needle in ((False, "needs a Hugging Face token"), ("hf_not_granted", "has not been granted")):
        with pytest.raises(WeightsError) as exc:
            hub_download(spec, cache_dir=tmp_path / "cache", token=token, endpoint=hub)
        text = _one_line(exc)
        assert needle in text, text
        assert "request access at https://huggingface.co/Wangyh/mSTAR" in text and "--weights PATH" in text
    uni = get_spec("uni")  # unknown to this hub: 401 RepoNotFound, as huggingface.co answers without a token
    with pytest.raises(WeightsError, match="gated/private and no valid token") as exc:
        hub_download(uni, cache_dir=tmp_path / "cache", token=False, endpoint=hub)
    assert "https://huggingface.co/MahmoodLab/UNI" in _one_line(exc)


def test_cli_download_then_offline_use(tmp_path: Path, hub: str) -> None:
    denied = _mstar(["weights", "download", "mstar"], _env(tmp_path, hub))
    assert denied.returncode == 1
    err_lines = [ln for ln in denied.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(err_lines) == 1 and "Traceback" not in denied.stderr
    assert "HF_TOKEN" in err_lines[0] and "--weights PATH" in err_lines[0]

    ok = _mstar(["weights", "download", "mstar", "--json"], _env(tmp_path, hub, HF_TOKEN=GOOD_TOKEN))
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    path = Path(info["path"])
    assert path.read_bytes() == PAYLOAD and info["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert f"models--Wangyh--mSTAR/snapshots/{COMMIT}/mSTAR.pth" in str(path)
    assert str(tmp_path / "cache") in str(path)

    # later, offline: the cache answers, no hub needed
    offline_env = _env(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    lst = _mstar(["weights", "list", "--json"], offline_env)
    assert lst.returncode == 0, lst.stderr
    rows = {r["name"]: r for r in json.loads(lst.stdout)["models"]}
    assert rows["mstar"]["cached_path"] == str(path) and rows["uni"]["cached_path"] is None
    ver = _mstar(["weights", "verify", "mstar", "--no-load", "--json"], offline_env)
    assert ver.returncode == 0, ver.stderr
    assert json.loads(ver.stdout)["sha256"] == info["sha256"]

    to = _mstar(["weights", "download", "mstar", "--to", str(tmp_path / "weights")],
                _env(tmp_path, hub, HF_TOKEN=GOOD_TOKEN))
    assert to.returncode == 0, to.stderr
    assert (tmp_path / "weights" / "mSTAR.pth").read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_list_and_verify(tmp_path: Path, tiny: torch.nn.Module) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_main, ["weights", "list", "--json", "--cache-dir", str(tmp_path / "nocache")])
    assert res.exit_code == 0, res.output
    models = {m["name"]: m for m in json.loads(res.stdout)["models"]}
    assert models["mstar"]["hub_repo"] == "Wangyh/mSTAR" and models["mstar"]["sha256"] is None
    assert models["uni"]["licence"] == "CC-BY-NC-ND-4.0"

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    res = runner.invoke(cli_main, ["weights", "verify", str(path), "--model", TINY, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["sha256"] == digest and out["loads_strict"] is True and out["checksum_ok"] is None
    res = runner.invoke(cli_main, ["weights", "verify", str(path), "--model", TINY, "--sha256", digest])
    assert res.exit_code == 0 and digest in res.stdout
    res = runner.invoke(cli_main, ["weights", "verify", str(path), "--model", TINY, "--sha256", "0" * 64])
    assert res.exit_code == 1 and "does not match" in res.stderr
    # a file of another architecture: one line naming the mismatch, exit 1
    res = runner.invoke(cli_main, ["weights", "verify", str(path), "--model", "timm:vit_small_patch16_224"])
    assert res.exit_code == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and "shape mismatch" in errors[0] and "Traceback" not in res.stderr
