#!/bin/bash
# =====================================================================================================
# Submit extract_array.sbatch, then a tiny follow-up job that runs when the array has ended (whatever its
# outcome), asks `mstar status OUT --jsonl` whether every slide is finished, and resubmits the array if
# slides are still missing (tasks hit their time limit, a node died, ...). At most MAX_ROUNDS rounds; a
# round that finishes no new slide stops the loop (for example when the only problems are broken slides,
# which fail again on every retry: look at `mstar status OUT --failed`).
#
# Run once, on a login node, from the repository folder:
#     SLIDES=/data/cohort OUT=/scratch/$USER/feats ARRAY=0-19%10 examples/slurm/resubmit.sh
# =====================================================================================================
set -euo pipefail

ROUND=${1:-1}                                # which round this is (the follow-up job passes ROUND+1)
PREVIOUS=${2:--1}                            # slides finished after the previous round
MAX_ROUNDS=${MAX_ROUNDS:-3}                  # give up after this many submissions
: "${SLIDES:?set SLIDES (folder or list of slides)}"
: "${OUT:?set OUT (the shared output folder)}"
ARRAY=${ARRAY:-0-9}                          # array range of each submission
HERE=$(cd "$(dirname "$0")" && pwd)          # the folder of this script (examples/slurm)

# How many slides there should be: the lines of a list file, or the slide files of a folder.
if [ -f "$SLIDES" ]; then
    EXPECTED=$(grep -cvE '^\s*(#|$)' "$SLIDES")                     # non-empty, non-comment lines
    case "$SLIDES" in *.csv) EXPECTED=$((EXPECTED - 1));; esac      # minus the CSV header
else
    EXPECTED=$(find "$SLIDES" -type f \( -iname '*.svs' -o -iname '*.tif' -o -iname '*.tiff' -o \
        -iname '*.ndpi' -o -iname '*.mrxs' -o -iname '*.scn' -o -iname '*.vms' -o -iname '*.bif' \) | wc -l)
fi

if [ "$ROUND" -gt 1 ]; then
    # One JSON line: {"event": "summary", "counts": {...}, "complete": true|false, ...}
    summary=$(mstar status "$OUT" --jsonl --expect "$EXPECTED" | tail -n 1) || true
    read -r complete finished < <(python3 -c '
import json, sys
s = json.loads(sys.argv[1]); c = s["counts"]
print(str(s["complete"]).lower(), c["done"] + c["skipped"] + c["no_tissue"])' "$summary")
    echo "round $ROUND: $finished of $EXPECTED slides finished, complete=$complete"
    if [ "$complete" = true ]; then echo "all slides finished"; exit 0; fi
    if [ "$ROUND" -gt "$MAX_ROUNDS" ]; then echo "giving up after $MAX_ROUNDS rounds"; exit 1; fi
    if [ "$finished" -le "$PREVIOUS" ]; then
        echo "no progress in the last round; see: mstar status $OUT --failed"; exit 1
    fi
    PREVIOUS=$finished
fi

# Submit the array, and the follow-up check that starts after every task of it has ended (afterany).
mkdir -p logs
job=$(sbatch --parsable --array="$ARRAY" --export=ALL,SLIDES="$SLIDES",OUT="$OUT" "$HERE/extract_array.sbatch")
sbatch --dependency=afterany:"${job%%;*}" --job-name=mstar-check --ntasks=1 --cpus-per-task=1 --mem=2G \
    --time=00:15:00 --output=logs/mstar-check-%j.out --export=ALL,SLIDES="$SLIDES",OUT="$OUT",ARRAY="$ARRAY" \
    --wrap="bash '$HERE/resubmit.sh' $((ROUND + 1)) $PREVIOUS"
echo "round $ROUND submitted: array job ${job%%;*}"
