#!/usr/bin/env bash
# The whole mSTAR pipeline on a tiny toy world, on a CPU (docs/downstream.md, "Tiny example"):
#   toy data -> extract (frozen encoder) -> stage 1 -> stage 2 -> export -> embed-slides -> zeroshot
# on held-apart slides. Usage: examples/zeroshot/run_tiny.sh OUTDIR
# The toy slides' pixels and their reports share a class (stain intensity / class words) and nothing else, so
# zero-shot accuracy above chance is learnt: stage 1 aligns slides with reports, stage 2 distils that into
# patch features + proj. The last line printed is one JSON object with "accuracy" and "chance".
# MSTAR (default: mstar) and PYTHON (default: python) choose the executables.
set -euo pipefail
OUT=${1:?usage: $0 OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
MSTAR=${MSTAR:-mstar}
PYTHON=${PYTHON:-python}
TOPJ=10   # the top-j reported as "accuracy" (every j is in zeroshot/zeroshot.csv and zeroshot_metrics.json)
mkdir -p "$OUT"
cd "$OUT"
step() { echo "== $(date +%T) $*" >&2; }

step "toy world: 30 training + 12 held-apart slides, 3 classes"
$PYTHON -m mstar_extract.pretrain.toyworld data >&2
step "frozen-encoder bags of the training slides"
$MSTAR extract data/slides/train data/bags --model timm:test_vit --weights data/frozen.pth --workers 0 --no-qc --no-report -q
step "stage 1: slide aggregator + report encoder"
$MSTAR pretrain --stage 1 --config "$HERE/stage1.yaml" --set data.manifest=data/stage1_manifest.csv \
    --set text.model=data/tiny_bert --out stage1 -q
step "stage 2: student + proj, distilled from the stage-1 aggregator"
$MSTAR pretrain --stage 2 --config "$HERE/stage2.yaml" --set data.manifest=data/stage2_manifest.csv \
    --set teacher.file=stage1/teacher.pt --init data/frozen.pth --out stage2 -q
step "export: the zero-shot checkpoint (stage 2 also wrote stage2/zeroshot.pth)"
$MSTAR pretrain export --stage1 stage1 --stage2 stage2 zeroshot.pth -q >/dev/null
step "held-apart slides: slide embeddings from frozen-encoder bags"
$MSTAR extract data/slides/test test_frozen --model timm:test_vit --weights data/frozen.pth --workers 0 --no-qc --no-report -q
$MSTAR embed-slides test_frozen test_frozen --aggregator stage1/teacher.pt -q
step "held-apart slides: zero-shot from student bags"
$MSTAR extract data/slides/test test_student --model timm:test_vit --weights stage2/student.pth --workers 0 --no-qc --no-report -q
$MSTAR zeroshot test_student zeroshot --checkpoint zeroshot.pth --prompts data/prompts.json --labels data/labels.csv -q
step "done"
$PYTHON - "$TOPJ" <<'PY'
import csv, json, sys
j = sys.argv[1]
m = json.load(open("zeroshot/zeroshot_metrics.json"))
n_emb = sum(1 for _ in csv.DictReader(open("test_frozen/slide_features.csv")))
print(json.dumps({"accuracy": m["by_j"][j]["accuracy"], "balanced_accuracy": m["by_j"][j]["balanced_accuracy"],
                  "chance": m["chance"], "top_j": int(j), "n_slides": m["n_labelled"], "slide_embeddings": n_emb,
                  "accuracy_by_j": {k: v["accuracy"] for k, v in m["by_j"].items()}}))
PY
