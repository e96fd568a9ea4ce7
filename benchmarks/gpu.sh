#!/usr/bin/env bash
# GPU throughput check, for a GPU machine with this repository copied over (no network needed).
#
#   bash benchmarks/gpu.sh [WORKDIR]        # default WORKDIR: ${TMPDIR:-/tmp}/mstar-gpu-bench
#
# Offline set-up: uses $PYTHON (default: .venv/bin/python if present, else python3) with the repository on
# PYTHONPATH (nothing is built or downloaded). Wheels found in .whl/ at the repository root (e.g.
# openslide-python + openslide-bin, or tiffslide + its dependencies, pytest) are installed first with
# `pip install --no-index --no-deps --target $WORK/site` and put on PYTHONPATH.
#
# Steps, in this order, each under `timeout` (the smaller of its cap and the time left) and continuing on failure;
# the caps before the last step add up to less than the budget (about 440 s of 470 with ~15 s of set-up), so
# the end-to-end extract always runs, and a slow step only takes time from the steps after it:
#   model_bf16          mstar bench model   ViT-L bf16, batch 256: the model-only ceiling
#   (slide)             a 40x fixture slide is built in the background meanwhile, tiled once, and linked
#                       $MSTAR_GPU_BENCH_COPIES times (its coordinates too, so planning is not timed)
#   read_wN             mstar bench read    the reader alone, N = the default --workers of this machine
#   extract_bf16        mstar bench extract the whole pipeline, ViT-L bf16 (random weights)
#   extract_tiny        mstar bench extract the pipeline with a tiny ViT: the reader/pipeline ceiling
#   pytest_gpu          pytest -m gpu       the CUDA-marked tests (needs pytest; carry its wheel in .whl/)
#   train_stage2        mstar bench train   stage-2 training throughput
#   model_bf16_compile  mstar bench model --compile: optional, last, gets whatever time is left
# and prints one table (also when interrupted: SIGTERM/SIGINT/exit), with the pipeline's share of the
# model-only throughput. Each finished step also prints one line at once, so a hard kill still leaves results.
#
# Knobs (environment): MSTAR_GPU_BENCH_BUDGET (seconds, default 470), MSTAR_GPU_BENCH_DEVICE (default auto;
# `cpu` for a dry run), MSTAR_GPU_BENCH_MODEL (default mstar), MSTAR_GPU_BENCH_SLIDE (an existing slide instead
# of building one), MSTAR_GPU_BENCH_COPIES (default 48), MSTAR_GPU_BENCH_BATCH (default 256),
# MSTAR_GPU_BENCH_PRECISION (default bf16), MSTAR_GPU_BENCH_TINY (default timm:vit_tiny_patch16_224).
# A dry run of the script's logic on a CPU:
#   MSTAR_GPU_BENCH_BUDGET=150 MSTAR_GPU_BENCH_DEVICE=cpu MSTAR_GPU_BENCH_BATCH=8 MSTAR_GPU_BENCH_PRECISION=fp32 \
#   MSTAR_GPU_BENCH_MODEL=timm:vit_tiny_patch16_224 MSTAR_GPU_BENCH_COPIES=2 bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
WORK=${1:-${TMPDIR:-/tmp}/mstar-gpu-bench}
BUDGET=${MSTAR_GPU_BENCH_BUDGET:-470}
DEVICE=${MSTAR_GPU_BENCH_DEVICE:-auto}
MODEL=${MSTAR_GPU_BENCH_MODEL:-mstar}
COPIES=${MSTAR_GPU_BENCH_COPIES:-48}
BATCH=${MSTAR_GPU_BENCH_BATCH:-256}
PREC=${MSTAR_GPU_BENCH_PRECISION:-bf16}
TINY=${MSTAR_GPU_BENCH_TINY:-timm:vit_tiny_patch16_224}
START=$(date +%s)
mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
CURRENT_PID=""
CURRENT_NAME=""
SLIDE_PID=""

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# -- the table (always printed: on normal exit, and on SIGTERM/SIGINT via the traps below) ------------------
table() {
    "$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
def last_json(path):
    try:
        text = open(path).read()
    except OSError:
        return {}, ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for start in [i for i, c in enumerate(text) if c == "{"]:
        try:
            doc = json.loads(text[start:])
            return (doc if isinstance(doc, dict) else {}), ""
        except ValueError:
            continue
    return {}, (lines[-1][:100] if lines else "")
docs = {}
out = [("step", "patches/s", "share", "device", "batch", "workers", "precision", "seconds", "status")]
for name, status, *rest in rows:
    d, note = last_json(rest[0]) if rest and rest[0] else ({}, "")
    docs[name] = d
    pps = d.get("patches_per_s", d.get("samples_per_s"))
    share = "-"
    kind = name.split("_")
    base = (f"model_{kind[1]}" if kind[0] == "extract" and kind[1] != "tiny" and len(kind) == 2
            else ("read" if name == "extract_tiny" else None))
    base_doc = next((v for k, v in docs.items() if base and (k == base or (base == "read" and k.startswith("read_")))), {})
    if isinstance(pps, (int, float)) and isinstance(base_doc.get("patches_per_s"), (int, float)) and base_doc["patches_per_s"] > 0:
        share = f"{100 * pps / base_doc['patches_per_s']:.0f}% of {base}"
    out.append((name, f"{pps:.1f}" if isinstance(pps, (int, float)) else "-", share,
                str(d.get("device_name", d.get("device", "-"))), str(d.get("batch_size", "-")), str(d.get("workers", "-")),
                str(d.get("precision") or "-"), f"{d['seconds']:.1f}" if isinstance(d.get("seconds"), (int, float)) else "-",
                status + (f": {note}" if note else "")))
w = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
print()
for r in out:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
for name, ext in docs.items():
    mod = docs.get(name.replace("extract_", "model_", 1), {}) if name.startswith("extract_") else {}
    if isinstance(ext.get("patches_per_s"), (int, float)) and mod.get("patches_per_s"):
        print(f"\npipeline share of model-only throughput: {name} / {name.replace('extract_', 'model_', 1)} = "
              f"{ext['patches_per_s']:.1f} / {mod['patches_per_s']:.1f} = {100 * ext['patches_per_s'] / mod['patches_per_s']:.0f}%")
EOF
}

finish() {
    trap - EXIT INT TERM
    [ -n "$SLIDE_PID" ] && kill "$SLIDE_PID" 2>/dev/null
    table
    echo "total: $(( $(date +%s) - START )) s (budget ${BUDGET} s); logs in $WORK" >&2
}

interrupted() {
    local sig=$1
    if [ -n "$CURRENT_PID" ]; then
        kill -TERM "$CURRENT_PID" 2>/dev/null   # `timeout` passes it on to the step
        printf '%s\tinterrupted (SIG%s)\t%s\n' "$CURRENT_NAME" "$sig" "$WORK/$CURRENT_NAME.out" >> "$RESULTS"
    fi
    finish
    if [ "$sig" = TERM ]; then exit 143; else exit 130; fi
}
trap finish EXIT
trap 'interrupted TERM' TERM
trap 'interrupted INT' INT

# step NAME CAP CMD... : run with the smaller of CAP and the time left; keep stdout, log stderr; one line at once.
# The step runs in the background and is waited for, so SIGTERM/SIGINT reach the traps while it runs.
step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt 15 ]; then
        printf '%s\tskipped (time budget spent)\t\n' "$name" >> "$RESULTS"
        echo "-- $name: skipped (time budget spent)"
        return 0
    fi
    remaining=$(( remaining - 5 ))  # the table still has to be printed within the budget
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name (timeout ${limit}s): $*" >&2
    local t0; t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" &
    CURRENT_PID=$! CURRENT_NAME=$name
    wait "$CURRENT_PID"
    local rc=$?
    CURRENT_PID="" CURRENT_NAME=""
    local dt=$(( $(date +%s) - t0 ))
    local status="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout after ${limit}s"
    elif [ $rc -ne 0 ]; then
        status="failed (exit $rc): $(grep -v '^\s*$' "$WORK/$name.err" | tail -n 1 | cut -c1-120)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$status ($dt s)" "$WORK/$name.out" >> "$RESULTS"
    tail -n 3 "$WORK/$name.err" >&2
    echo "-- $name: $status ($dt s) $(grep -o '"patches_per_s": [0-9.]*' "$WORK/$name.out" | tail -n 1)"
    return 0
}

# -- offline set-up: carried wheels, then the repository on PYTHONPATH --------------------------------------
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    mkdir -p "$WORK/site"
    if ! "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$REPO"/.whl/*.whl > "$WORK/wheels.log" 2>&1; then
        for whl in "$REPO"/.whl/*.whl; do  # one bad wheel (another platform) must not stop the others
            "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$whl" >> "$WORK/wheels.log" 2>&1 \
                || echo "wheel not installed: $(basename "$whl") (see $WORK/wheels.log)" >&2
        done
    fi
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MSTAR=("$PY" -m mstar_extract)

echo "== python: $PY; budget ${BUDGET}s; device $DEVICE; model $MODEL" >&2
"$PY" - <<'EOF' >&2 || true
import importlib, platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("torch: not importable:", e)
for m in ("timm", "openslide", "tiffslide", "tifffile", "imagecodecs", "cv2", "h5py", "click", "pytest"):
    try:
        importlib.import_module(m); print(m, "ok")
    except Exception as e:
        print(m, "MISSING:", e)
EOF

# -- fixture slide, built in the background while the model-only step runs ----------------------------------
SLIDE="${MSTAR_GPU_BENCH_SLIDE:-$WORK/slides/bench40x.svs}"
if [ ! -f "$SLIDE" ]; then
    mkdir -p "$(dirname "$SLIDE")"
    "$PY" -c "
import os, sys
from mstar_extract.testing.fixtures import make_large_svs
make_large_svs(sys.argv[1] + '.tmp.svs', width=30000, height=20000)
os.replace(sys.argv[1] + '.tmp.svs', sys.argv[1])" "$SLIDE" > "$WORK/build_slide.log" 2>&1 &
    SLIDE_PID=$!
fi
WORKERS=$("$PY" -c "from mstar_extract.envdefaults import default_workers; print(default_workers())" 2>/dev/null || echo 4)
DEV=(--device "$DEVICE")

# -- benchmarks ------------------------------------------------------------------------------------------
step "model_$PREC" 50 "${MSTAR[@]}" bench model --model "$MODEL" "${DEV[@]}" --precision "$PREC" --batch-size "$BATCH" \
    --no-compile --seconds 10 --json

if [ -n "$SLIDE_PID" ]; then  # wait for the slide, at most 45 s more
    for _ in $(seq 45); do kill -0 "$SLIDE_PID" 2>/dev/null || break; sleep 1; done
    kill "$SLIDE_PID" 2>/dev/null && echo "slide build: still running after the wait; stopped" >&2
    wait "$SLIDE_PID" 2>/dev/null
    SLIDE_PID=""
fi
MANY="$WORK/many"
if [ -f "$SLIDE" ]; then
    step tile 20 "${MSTAR[@]}" tile "$SLIDE" "$WORK/tiles" --overwrite -q
    ID=$(basename "${SLIDE%.*}")
    if [ -f "$WORK/tiles/coords/$ID.h5" ]; then
        rm -rf "$MANY" && mkdir -p "$MANY/slides" "$MANY/coords"
        for i in $(seq "$COPIES"); do
            ln -s "$SLIDE" "$MANY/slides/${ID}_$i.${SLIDE##*.}"
            ln -s "$WORK/tiles/coords/$ID.h5" "$MANY/coords/${ID}_$i.h5"
        done
    fi
else
    echo "no fixture slide (see $WORK/build_slide.log): the read and extract steps are skipped" >&2
fi
if [ -d "$MANY/coords" ]; then
    C=(--coords-dir "$MANY/coords")
    step "read_w$WORKERS" 35 "${MSTAR[@]}" bench read "$MANY/slides" "${C[@]}" --workers "$WORKERS" --batch-size "$BATCH" --json
    step "extract_$PREC" 75 "${MSTAR[@]}" bench extract "$MANY/slides" "${C[@]}" --model "$MODEL" "${DEV[@]}" \
        --weights random --precision "$PREC" --batch-size "$BATCH" --workers "$WORKERS" --json
    step extract_tiny 35 "${MSTAR[@]}" bench extract "$MANY/slides" "${C[@]}" --model "$TINY" "${DEV[@]}" \
        --weights random --precision "$PREC" --batch-size "$BATCH" --workers "$WORKERS" --json
fi
if "$PY" -c "import pytest" 2>/dev/null; then
    step pytest_gpu 70 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests
else
    printf 'pytest_gpu\tskipped (pytest not importable: carry its wheels in .whl/)\t\n' >> "$RESULTS"
fi
if "${MSTAR[@]}" bench --help 2>/dev/null | grep -qE '^\s+train\b'; then
    step train_stage2 40 "${MSTAR[@]}" bench train --model "$MODEL" "${DEV[@]}" --json
fi
step "model_${PREC}_compile" "$BUDGET" "${MSTAR[@]}" bench model --model "$MODEL" "${DEV[@]}" --precision "$PREC" --batch-size "$BATCH" \
    --compile --seconds 10 --json
