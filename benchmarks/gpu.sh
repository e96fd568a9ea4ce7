#!/usr/bin/env bash
# GPU throughput check, for a GPU machine with this repository copied over (no network needed).
#
#   bash benchmarks/gpu.sh [WORKDIR]        # default WORKDIR: ${TMPDIR:-/tmp}/mstar-gpu-bench
#
# Uses $PYTHON (default: .venv/bin/python if present, else python3), installs the package without
# dependencies (or falls back to PYTHONPATH), builds a 40x fixture slide, then runs, each step under `timeout`
# and continuing on failure:
#   mstar bench model   (bf16, batch 256, without and with --compile)
#   mstar bench read    (reader only, all CPU cores)
#   mstar bench extract (whole pipeline, random weights, bf16, batch 256)
#   mstar bench train   (stage-2 training throughput, only if that subcommand exists)
# and prints one table. The whole script stays under MSTAR_GPU_BENCH_BUDGET seconds (default 470 = 7m50s).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
WORK=${1:-${TMPDIR:-/tmp}/mstar-gpu-bench}
BUDGET=${MSTAR_GPU_BENCH_BUDGET:-470}
START=$(date +%s)
mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME TIMEOUT CMD... : run with the smaller of TIMEOUT and the time left; keep stdout JSON, log stderr
step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt 15 ]; then
        printf '%s\tskipped (time budget spent)\t\n' "$name" >> "$RESULTS"; return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name (timeout ${limit}s): $*" >&2
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local status="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout after ${limit}s"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc): $(grep -v '^\s*$' "$WORK/$name.err" | tail -n 1 | cut -c1-120)"
    printf '%s\t%s\t%s\n' "$name" "$status ($dt s)" "$WORK/$name.out" >> "$RESULTS"
    tail -n 3 "$WORK/$name.err" >&2
    return 0
}

# -- environment -----------------------------------------------------------------------------------------
echo "== python: $PY" >&2
"$PY" - <<'EOF' >&2 || true
import importlib, platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("torch: not importable:", e)
for m in ("timm", "openslide", "tiffslide", "tifffile", "imagecodecs", "cv2", "h5py", "click"):
    try:
        importlib.import_module(m); print(m, "ok")
    except Exception as e:
        print(m, "MISSING:", e)
EOF

# -- install (offline: no dependencies) ------------------------------------------------------------------
if ! timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -q -e "$REPO" >"$WORK/install.log" 2>&1; then
    echo "pip install failed (see $WORK/install.log); using PYTHONPATH=$REPO" >&2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MSTAR=("$PY" -c "import sys; from mstar_extract.cli import main; sys.argv[0] = 'mstar'; main()")

# -- fixture slide ---------------------------------------------------------------------------------------
SLIDE="${MSTAR_GPU_BENCH_SLIDE:-$WORK/slides/bench40x.svs}"
if [ ! -f "$SLIDE" ]; then
    mkdir -p "$WORK/slides"
    step build_slide 120 "$PY" -c "
from mstar_extract.testing.fixtures import make_large_svs
import os
make_large_svs('$SLIDE.tmp.svs', width=30000, height=20000)
os.replace('$SLIDE.tmp.svs', '$SLIDE')
print('{}')"
fi
NCPU=$(nproc 2>/dev/null || echo 4)
WORKERS=$(( NCPU > 2 ? NCPU - 2 : 1 ))
[ "$WORKERS" -gt 12 ] && WORKERS=12

# -- benchmarks ------------------------------------------------------------------------------------------
step model_bf16 90 "${MSTAR[@]}" bench model --precision bf16 --batch-size 256 --no-compile --json
step model_bf16_compile 180 "${MSTAR[@]}" bench model --precision bf16 --batch-size 256 --compile --json
if [ -f "$SLIDE" ]; then
    step read_w$WORKERS 60 "${MSTAR[@]}" bench read "$SLIDE" --workers "$WORKERS" --batch-size 256 --json
    step extract_bf16 150 "${MSTAR[@]}" bench extract "$SLIDE" --weights random --precision bf16 --batch-size 256 \
        --workers "$WORKERS" --json
fi
if "${MSTAR[@]}" bench --help 2>/dev/null | grep -qE '^\s+train\b'; then
    step train_stage2 90 "${MSTAR[@]}" bench train --json
fi

# -- table -----------------------------------------------------------------------------------------------
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
def last_json(path):
    try:
        text = open(path).read()
    except OSError:
        return {}
    for start in [i for i, c in enumerate(text) if c == "{"]:
        try:
            doc = json.loads(text[start:])
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            continue
    return {}
print()
hdr = ("step", "patches/s", "device", "batch", "workers", "precision", "seconds", "status")
out = [hdr]
for name, status, *rest in rows:
    d = last_json(rest[0]) if rest and rest[0] else {}
    pps = d.get("patches_per_s", d.get("samples_per_s"))
    out.append((name, f"{pps:.1f}" if isinstance(pps, (int, float)) else "-", str(d.get("device", "-")),
                str(d.get("batch_size", "-")), str(d.get("workers", "-")), str(d.get("precision", "-")),
                f"{d['seconds']:.1f}" if isinstance(d.get("seconds"), (int, float)) else "-", status))
w = [max(len(r[i]) for r in out) for i in range(len(hdr))]
for r in out:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
EOF
echo "total: $(( $(date +%s) - START )) s (budget ${BUDGET} s); logs in $WORK" >&2
