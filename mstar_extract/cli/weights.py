"""``mstar weights list|download|verify`` — the weights registry, fetching from the hub, checksums.

Heavy imports (torch, timm, huggingface_hub) happen inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mstar_extract.cli.common import env_default, output_options
from mstar_extract.console import Reporter
from mstar_extract.errors import EXIT_FAILED, EXIT_OK, UsageError, WeightsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def weights() -> None:
    """List, download and verify model weights (registry: weights/registry.json; see weights/README.md).

    \b
    Examples:
      mstar weights list
      HF_TOKEN=hf_... mstar weights download mstar            # into the hub cache (or $MSTAR_CACHE)
      mstar weights download mstar --to weights/               # a plain file weights/mSTAR.pth
      mstar weights verify weights/mSTAR.pth --model mstar
    """


@weights.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON on stdout.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Hub cache (default $MSTAR_CACHE or the HF cache).")
@output_options(jsonl=False)
def list_cmd(as_json: bool, cache_dir: str | None, reporter: Reporter) -> int:
    """Known models: hub repository, file, architecture, feature size, licence, sha256, cached or not."""
    from mstar_extract.models.registry import list_specs
    from mstar_extract.models.weights import cached_hub_file

    rows = []
    for spec in list_specs():
        d = spec.to_json()
        try:
            found = cached_hub_file(spec, cache_dir)
        except Exception:  # noqa: BLE001 - a broken cache must not break `list`
            found = None
        d["cached_path"] = str(found) if found else None
        rows.append(d)
    if as_json:
        click.echo(json.dumps({"models": rows}, indent=2))
        return EXIT_OK
    header = f"{'name':<7} {'hub file':<32} {'architecture':<22} {'dim':>5}  {'licence':<16} {'sha256':<8} cached"
    click.echo(header)
    for d in rows:
        hub = f"{d['hub_repo']}/{d['hub_filename']}"
        sha = "known" if d["sha256"] else "unknown"
        click.echo(
            f"{d['name']:<7} {hub:<32} {d['architecture']:<22} {d['feature_dim']:>5}  {d['licence']:<16} {sha:<8} "
            f"{d['cached_path'] or 'no'}"
        )
    click.echo("timm:<name>  any timm model (num_classes=0), its own hub repo and preprocessing")
    return EXIT_OK


@weights.command("download")
@click.argument("name")
@click.option("--to", "to_dir", type=click.Path(file_okay=False), default=None,
              help="Put a plain copy in this folder (e.g. weights/) instead of the hub cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Hub cache folder (default $MSTAR_CACHE, else the huggingface_hub cache).")
@click.option("--token", default=None, metavar="TOKEN",
              help="Hugging Face token (default: $HF_TOKEN or a saved `huggingface-cli login`; prefer those).")
@click.option("--json", "as_json", is_flag=True, help="Print {name, path, sha256, verified} as JSON on stdout.")
@output_options(jsonl=False)
def download_cmd(name: str, to_dir: str | None, cache_dir: str | None, token: str | None, as_json: bool,
                 reporter: Reporter) -> int:
    """Fetch NAME's weights from the Hugging Face hub (gated: request access first, see weights/README.md)."""
    from mstar_extract.models.registry import get_spec
    from mstar_extract.models.weights import hub_download, sha256_file

    spec = get_spec(name)
    reporter.info(f"downloading {spec.hub_repo}/{spec.hub_filename} ...")
    path = hub_download(spec, cache_dir=cache_dir, token=token or env_default("HF_TOKEN"), local_dir=to_dir)
    digest = sha256_file(path)
    verified = None if spec.sha256 is None else digest == spec.sha256.lower()
    if verified is False:
        raise WeightsError(f"{path}: sha256 {digest} differs from the registry's {spec.sha256} (corrupt download?)")
    if as_json:
        click.echo(json.dumps({"name": spec.name, "path": str(path), "sha256": digest, "verified": verified}))
    else:
        click.echo(f"{path}")
        reporter.info(f"sha256 {digest}" + (" (matches the registry)" if verified else " (no registry checksum)"))
        reporter.info(f"use it with: mstar extract ... --model {spec.name} --weights {path}")
    return EXIT_OK


def _file_to_verify(path_or_name: str, model: str | None, cache_dir: str | None) -> tuple[Any, Path]:
    """(the architecture's spec, the weights file) of ``mstar weights verify PATH_OR_NAME``."""
    from mstar_extract.models.registry import BUILTIN, get_spec
    from mstar_extract.models.weights import cached_hub_file

    arg = Path(path_or_name).expanduser()
    if arg.exists():
        spec = get_spec(model or "mstar")
        path = arg
    elif path_or_name.lower() in BUILTIN or path_or_name.startswith("timm:"):
        spec = get_spec(model or path_or_name)
        found = cached_hub_file(get_spec(path_or_name), cache_dir)
        if found is None:
            raise WeightsError(
                f"{path_or_name}: weights not in the cache; run `mstar weights download {path_or_name}` or pass a PATH"
            )
        path = found
    else:
        raise UsageError(f"{path_or_name}: no such file and not a registry name (see `mstar weights list`)")
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")
    return spec, path


@weights.command("verify")
@click.argument("path_or_name")
@click.option("--model", "model", default=None,
              help="Architecture to load the file into (default: NAME itself, or mstar for a PATH).")
@click.option("--sha256", "sha256", default=None, metavar="HEX", help="Expected sha256 (default: the registry's, if known).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Hub cache to look NAME up in.")
@click.option("--no-load", is_flag=True, help="Only check the checksum; skip loading into the architecture.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@output_options(jsonl=False)
def verify_cmd(path_or_name: str, model: str | None, sha256: str | None, cache_dir: str | None, no_load: bool,
               as_json: bool, reporter: Reporter) -> int:
    """Check a weights file: its sha256 (against --sha256 or the registry) and a strict load into the model.

    PATH_OR_NAME is a file, or a registry name whose file is looked up in the cache (no download).
    """
    from mstar_extract.models.weights import ResolvedWeights, build_with_weights, sha256_file

    spec, path = _file_to_verify(path_or_name, model, cache_dir)
    digest = sha256_file(path)
    want = (sha256 or spec.sha256 or "").strip().lower() or None
    if want is not None and len(want) != 64:
        raise UsageError(f"--sha256 {sha256!r}: expected 64 hex digits")
    checksum_ok = None if want is None else digest == want
    loads = None
    reason = None
    if not no_load:
        try:
            build_with_weights(spec, ResolvedWeights("path", path, digest))
            loads = True
        except WeightsError as exc:
            loads, reason = False, str(exc)
    ok = checksum_ok is not False and loads is not False
    result: dict[str, Any] = {
        "path": str(path), "model": spec.name, "sha256": digest, "expected_sha256": want,
        "checksum_ok": checksum_ok, "loads_strict": loads, "ok": ok, "error": reason,
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{digest}  {path}")
        if checksum_ok is None:
            reporter.info("sha256: no reference checksum known (pass --sha256 HEX to compare)")
        else:
            reporter.info(f"sha256: {'OK' if checksum_ok else 'MISMATCH, expected ' + str(want)}")
        if loads is not None:
            reporter.info(f"strict load into {spec.name} ({spec.architecture}): {'OK' if loads else 'FAILED'}")
    if not ok:
        if checksum_ok is False:
            reporter.error(f"{path}: sha256 {digest} does not match the expected {want}")
        if reason:
            reporter.error(reason)
        return EXIT_FAILED
    return EXIT_OK

