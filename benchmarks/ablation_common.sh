# What the ablation scripts (benchmarks/*_ablation/run.sh) share, sourced by them with their arguments after
# `set -euo pipefail`: the output directory R and the tools, then run_rows, the runner of their rows.
if [[ $# -ne 1 ]]; then echo "usage: bash ${BASH_SOURCE[1]} OUTPUT_DIR" >&2; exit 2; fi
R=$(mkdir -p "$1" && cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)   # the calling script's folder
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DISTIL=${DISTIL:-$REPO/.venv/bin/distil}
SEEDS=${SEEDS:-"56 57 58"}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# run_rows FUNCTION: calls `FUNCTION NAME SEED WORDS...` (WORDS: the row's value, split) for every row of the
# associative array ROWS (ONLY="name ..." limits them) and every seed of SEEDS, seed by seed, so that every row of the
# first seed is done before the next seed starts; JOBS calls side by side. FUNCTION runs in a child bash: export
# the variables it reads.
run_rows() {
    local function=$1 jobs_file seed name
    jobs_file=$(mktemp "$R/jobs.XXXXXX")
    for seed in $SEEDS; do
        for name in $(printf '%s\n' "${!ROWS[@]}" | sort); do
            if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then continue; fi
            echo "$name $seed ${ROWS[$name]}" >> "$jobs_file"
        done
    done
    export -f stamp "$function"
    xargs -r -P "$JOBS" -L 1 bash -c "$function"' "$@"' _ < "$jobs_file"
    rm -f "$jobs_file"
}

# train_distil_row NAME SEED OVERRIDE...: one `distil train` of RECIPE into $R/runs/NAME@SEED with the overrides
# ROW_BASE (words: the paths every row shares), the row's own, then EXTRA (a scale-down for a small machine, last so
# it wins); skipped when finished. A failure is logged and the other rows go on. Export R DISTIL RECIPE ROW_BASE EXTRA.
train_distil_row() {
    local name=$1 seed=$2; shift 2
    local run=$R/runs/$name@$seed
    if [[ ! -f $run/student/config.json ]]; then
        stamp "train $name seed $seed"
        # shellcheck disable=SC2086  # ROW_BASE and EXTRA are lists of words
        nice -n 5 "$DISTIL" train "$RECIPE" $ROW_BASE "run.output_dir=$run" "run.seed=$seed" "$@" ${EXTRA:-} \
            > "$R/logs/$name@$seed.log" 2>&1 || { stamp "FAILED $name seed $seed: see $R/logs/$name@$seed.log"; return 0; }
    fi
    stamp "done $name seed $seed"
}
