#!/usr/bin/env bash
# Cross-tokenizer smoke on real models (benchmarks/RETENTION.md, "Across tokenizers"): SmolLM2-135M -> a 6-layer
# student on the GPT-2 vocabulary, 30 steps x 4 sequences, one seed; run.sh is the full 3-seed table.
#   bash benchmarks/cross_tokenizer/smoke.sh OUT TEACHER_DIR     (TEACHER_DIR: llm_ablation/save_teacher.py's output)
# Needs the openai-whisper sdist in /tmp/whisper (pip download --no-deps --no-binary :all: openai-whisper -d /tmp/whisper).
set -euo pipefail
R=$(realpath -m "$1"); T=$2; mkdir -p "$R"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); PY=${PYTHON:-$REPO/.venv/bin/python}; D="$PY -m distil"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
G=$R/gpt2-tokenizer
[[ -f $G/tokenizer.json ]] || $PY $REPO/benchmarks/cross_tokenizer/build_gpt2_tokenizer.py /tmp/whisper/openai_whisper-*.tar.gz -o $G
[[ -f $R/train.txt ]] || ( (gzip -dc $REPO/data/demo/train.txt.gz || true) | head -n 400 > $R/train.txt)
[[ -f $R/heldout.txt ]] || ( (gzip -dc $REPO/data/demo/heldout.txt.gz || true) | head -n 60 > $R/heldout.txt)
for side in student teacher; do
  tok=$([[ $side == student ]] && echo $G || echo $T)
  [[ -d $R/data-$side ]] || $D prepare $R/train.txt --heldout-file $R/heldout.txt --tokenizer $tok --output-dir $R/data-$side --max-length 128
done
LAYERS=0,6,12,18,24,29
[[ -f $R/student-gpt2/config.json ]] || $D init-student $T --layers $LAYERS --tokenizer $G --transplant-vocabulary -o $R/student-gpt2 2>&1 | tail -3
[[ -f $R/student-same/config.json ]] || $D init-student $T --layers $LAYERS -o $R/student-same 2>&1 | tail -2
common="teacher.path=$T data.batch_size=4 optim.max_steps=${STEPS:-30} optim.lr=3e-4 run.log_every=5 run.eval_every=0 run.checkpoint_every=0 run.seed=56 run.progress=false data.max_length=128"
train() { local name=$1; shift; [[ -f $R/runs/$name/student/config.json ]] || $D train $REPO/benchmarks/llm_ablation/recipe.yaml $common run.output_dir=$R/runs/$name "$@" > $R/$name.log 2>&1; echo "done $name"; }
train lm-only student.path=$R/student-gpt2 data.path=$R/data-student loss.alpha_clm=1 loss.alpha_ce=0 loss.divergence=hybrid loss.alpha_cos=0
train hybrid student.path=$R/student-gpt2 data.path=$R/data-student loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=hybrid loss.alpha_cos=0
train uld student.path=$R/student-gpt2 data.path=$R/data-student loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=uld loss.alpha_cos=0
train same-kl student.path=$R/student-same data.path=$R/data-teacher loss.alpha_clm=1 loss.alpha_ce=1 loss.divergence=forward_kl loss.alpha_cos=0
$D evaluate teacher=$T transplanted=$R/student-gpt2 lm-only=$R/runs/lm-only/student hybrid=$R/runs/hybrid/student uld=$R/runs/uld/student same-kl=$R/runs/same-kl/student --data $R/data-student --output $R/eval.json --overwrite --no-speed 2>&1 | tail -40 > $R/eval.txt || true
echo finished
