#!/usr/bin/env bash
# README Results in one go, on one GPU: the seed pipeline with 3 seeds, a seed-aware
# Optuna sweep (3 seeds per trial, 16 trials, validation objective) and the sweep's
# best setting retrained the way the seed step is. Writes run dirs and logs under OUT.
#   bash benchmarks/results_gpu.sh OUT [extra overrides...]
# Data: KD_DATA (default: the JPEG CIFAR-10 copy at $KD_DATA_ROOT).
set -uo pipefail
OUT=$(realpath -m "$1"); shift
mkdir -p "$OUT"
PY=${PYTHON:-python3}
D=${KD_DATA:-"data=folder data.root=${KD_DATA_ROOT:?set KD_DATA_ROOT or KD_DATA}"}
SEEDS='trial.seeds=[42,43,44]'
TRIALS=${KD_TRIALS:-16}
JOBS=${KD_JOBS:-4}
stamp() { echo "$(date +%s) $*" >>"$OUT/timeline.txt"; }

stamp start
(
  $PY run.py -m experiment=seed_teacher $D trainer.progress=false seed=42,43,44 "$@" hydra.sweep.dir="$OUT/seed_teacher"
  stamp seed_teacher done
  $PY run.py experiment=seed_student $D trainer.progress=false "$SEEDS" "$@" hydra.run.dir="$OUT/seed_student"
  stamp seed_student done
  $PY run.py experiment=seed_kd $D trainer.progress=false "$SEEDS" "$@" hydra.run.dir="$OUT/seed_kd"
  stamp seed_kd done
) >"$OUT/pipeline.log" 2>&1 &
$PY run.py -m hparams_search=kd $D trainer.progress=false "$SEEDS" "$@" \
  hydra.sweeper.n_trials="$TRIALS" hydra.sweeper.n_jobs="$JOBS" \
  hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" hydra.sweep.dir="$OUT/sweep" >"$OUT/sweep.log" 2>&1
stamp sweep done
wait
read -r T A < <($PY -c "import yaml; p = yaml.safe_load(open('$OUT/sweep/optimization_results.yaml'))['best_params']; \
print(p['loss.temperature'], p['loss.alpha'])")
$PY run.py experiment=seed_kd $D trainer.progress=false "$SEEDS" loss.temperature="$T" loss.alpha="$A" "$@" \
  hydra.run.dir="$OUT/seed_kd_best" >"$OUT/best.log" 2>&1
stamp best done
