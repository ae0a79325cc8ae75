#!/usr/bin/env bash
# The SmolLM2 method comparison on a lent GPU machine, for its wall time (issue #7).
#
# Those machines reach no registry and take the working tree plus 64 MiB per call, while the comparison needs ~89 MB
# of wheels, SmolLM2's 94 MiB GGUF and ../shared data. So `make gpu-compare-kit` packs them here into part folders
# of at most 58 MiB (pomona-runs/gpu-compare-kit/part1..3: 58, 58 and 56 MiB when last packed), and one device call
# carries each part. A carried path stays on the machine while it is warm (30 s idle), so make the calls back to
# back; the last one, carrying the last part, checks all of them and runs:
#     1. command: bash bench/gpu_compare.sh 1   carry: ["pomona-runs/gpu-compare-kit/part1"]   timeout_s: 60
#     2. command: bash bench/gpu_compare.sh 2   carry: ["pomona-runs/gpu-compare-kit/part2"]   timeout_s: 60
#     3. command: bash bench/gpu_compare.sh 3   carry: ["pomona-runs/gpu-compare-kit/part3"]   timeout_s: 600
# (`make gpu-compare-kit` prints the parts; with another count, the last number runs.) Calls 1 and 2 take a
# second on the machine plus the transfer; call 1 also writes the image's package versions to $OUT. Device
# time: machine start 1-2 min + calls 1-2 under 1 min + call 3 under 10 min = 12-13 min of the 15.
#
# Call 3 rebuilds the GGUF, installs the wheels into a --target folder (--no-index --no-deps), imports SmolLM2 to
# pomona-runs/models/smollm2-135m-instruct (the recipes' path) and runs, on CUDA (device auto), first
# compare_smollm2_small.yaml - 19.5 min on a quiet 2-core CPU, so a few minutes here: the result this call must
# bring back - then compare_smollm2.yaml (69 min on that CPU) in whatever time is left. That one may not finish
# inside a single 10-minute call; stopped at the deadline it ends cleanly (SIGTERM: MLflow runs KILLED), and the
# summary still gives the wall time of every stage and method it finished. The whole script ends by DEADLINE_S
# (570 s), inside the call's 600 s.
#
#     bash bench/gpu_compare.sh N [--set key=value ...]     extra --set arguments go to every comparison run
#     GPU_COMPARE_RECIPES="configs/recipes/compare_smollm2_small.yaml"   to run only that one
#     GPU_COMPARE_HOME=DIR   the fresh POMONA_HOME of the runs (default /tmp/pomona-compare-home)
#
# Call 3 empties GPU_COMPARE_HOME, exported as POMONA_HOME, so that the wall time is a first run's: an inherited
# POMONA_HOME (your store, MLflow db, models, this kit) is never used nor touched. It only empties a folder it made
# itself (marked by a .gpu-compare-scratch file) or its own defaults under /tmp, and refuses any other.
#
# $OUT gets summary.md (wall times in all / per method / per stage, the comparison tables, log tails), the logs
# and comparison.csv files (8 files at most come back). Elsewhere $OUT is /tmp/pomona-gpu-compare-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pomona-gpu-compare-out}
KIT=${GPU_COMPARE_KIT:-pomona-runs/gpu-compare-kit}
PY=${PYTHON:-python3}
DEADLINE_S=${GPU_COMPARE_DEADLINE_S:-570}
RECIPES=${GPU_COMPARE_RECIPES:-configs/recipes/compare_smollm2_small.yaml configs/recipes/compare_smollm2.yaml}
PART=${1:?usage: bash bench/gpu_compare.sh PART [--set key=value ...]}
shift
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

$PY bench/gpu_compare_kit.py check "$KIT" "$PART" | tee "$OUT/part$PART.txt" || exit 1
PARTS=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['parts'])" "$KIT/part$PART/kit.json")
if [ "$PART" -lt "$PARTS" ]; then
    # the versions of what the kit relies on the image for: known for the next kit, at no extra call
    [ "$PART" = 1 ] && $PY -m pip list --format=freeze > "$OUT/image-packages.txt" 2>&1
    exit 0
fi

# ---------------------------------------------------------------------------------------------- the last call
ROOT=/tmp/pomona-compare-kit SITE=/tmp/pomona-compare-site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DS_BUILD_OPS=0 MPLBACKEND=Agg
: > "$SUMMARY"
note() { echo -e "$*" | tee -a "$SUMMARY"; }

# Empty DIR for this run and mark it as the script's: a folder is removed only when it is one of the script's
# own defaults under /tmp or carries the mark, so a mistyped GPU_COMPARE_HOME (., $HOME, a real store) is refused.
MARK=.gpu-compare-scratch
scratch() {
    local dir=$1 default=$2
    case "$dir" in /*) ;; *) note "$dir: not an absolute path; refusing to empty it"; return 1 ;; esac
    if [ -e "$dir" ] && [ "$dir" != "$default" ] && [ ! -e "$dir/$MARK" ]; then
        note "$dir exists and was not made by bench/gpu_compare.sh (no $MARK in it): not emptying it; pick another" \
             "GPU_COMPARE_HOME or remove it yourself"
        return 1
    fi
    rm -rf -- "$dir" && mkdir -p -- "$dir" && touch "$dir/$MARK"
}
# A fresh store each time: the wall time wanted is a first run's, not a rerun's of cached stages. Its own variable,
# never an inherited POMONA_HOME: that is the user's store (README: export POMONA_HOME=$PWD/pomona-runs).
export POMONA_HOME=${GPU_COMPARE_HOME:-/tmp/pomona-compare-home}
scratch "$POMONA_HOME" /tmp/pomona-compare-home && scratch "$SITE" /tmp/pomona-compare-site || exit 1

note "# SmolLM2 comparison on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU') ($(date -u +%FT%TZ))\n"
{ $PY bench/gpu_compare_kit.py assemble "$KIT" "$ROOT" \
  && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/wheels/*.whl
} > "$OUT/setup.log" 2>&1 || { note "kit assembly or wheel install failed:"; tail -n 30 "$OUT/setup.log" >> "$SUMMARY"; exit 1; }
export PYTHONPATH=$SITE
$PY bench/gpu_compare_kit.py env-check "$SITE" >> "$OUT/setup.log" 2>&1
note "kit ready after $SECONDS s; $($PY -c 'import torch, transformers, trl, prefect, mlflow
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| trl", trl.__version__, "| prefect", prefect.__version__, "| mlflow", mlflow.__version__)' 2>&1 | tail -n 1)"

MODEL=pomona-runs/models/smollm2-135m-instruct
t0=$SECONDS
$PY -m flows.cli import-smollm2 "$MODEL" --gguf "$(ls "$ROOT"/gguf/*.gguf)" >> "$OUT/setup.log" 2>&1 \
    || { note "import-smollm2 failed:"; tail -n 30 "$OUT/setup.log" >> "$SUMMARY"; exit 1; }
note "SmolLM2 imported in $((SECONDS - t0)) s\n"

for recipe in $RECIPES; do
    name=$(basename "$recipe" .yaml)
    # what the summary of this run still needs (MLflow query, tables) comes off its budget
    left=$((DEADLINE_S - SECONDS - 25))
    if [ "$left" -lt 60 ]; then
        note "## $name\n\nnot run: $left s left before the deadline\n"
        continue
    fi
    mapfile -t sets < <($PY bench/gpu_compare_kit.py overrides "$KIT" "$recipe" "$ROOT" | sed 's/^/--set\n/')
    t0=$SECONDS
    timeout -k 10 "$left" $PY -m flows.cli run --flow compare "$recipe" "${sets[@]}" "$@" > "/tmp/$name.log" 2>&1
    rc=$? wall=$((SECONDS - t0))
    case $rc in
        0) ended="finished" ;;
        124|143) ended="stopped at the deadline ($left s)" ;;
        *) ended="failed (exit $rc)" ;;
    esac
    note "## $name\n\n**$wall s** wall clock for \`pomona run --flow compare\` ($ended), Prefect and MLflow start-up included.\n"
    experiment=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$recipe")
    timeout 20 $PY bench/gpu_compare_kit.py summary "$experiment" >> "$SUMMARY" 2>&1
    table=$(ls -t "$POMONA_HOME"/store/compare-table/*/comparison.csv 2>/dev/null | head -n 1)
    # the table as `pomona run` prints it (headline metrics); every metric is in the csv beside it
    if [ "$rc" = 0 ] && [ -n "$table" ]; then
        cp "$table" "$OUT/$name-comparison.csv"
        echo >> "$SUMMARY"
        sed -n '/^Comparison \*\*/,/^[^|C]/p' "/tmp/$name.log" | grep -e '^|' -e '^Comparison' >> "$SUMMARY"
    fi
    # progress bars are carriage-return lines: the last state of each is enough
    tr '\r' '\n' < "/tmp/$name.log" | grep -v -e '^ *$' -e 'it/s\]$' -e 's/it\]$' | tail -n 4000 > "$OUT/$name.log"
    note "\nLog tail:\n\n\`\`\`"
    tail -n 40 "$OUT/$name.log" >> "$SUMMARY"
    note "\`\`\`\n"
done
note "finished after $SECONDS s"
