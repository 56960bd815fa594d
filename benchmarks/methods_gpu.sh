#!/usr/bin/env bash
# Every distillation method at its default setting, the seed's 10-epoch recipe, the
# same 3 seeds and the same stored teacher; one process per method, side by side.
#   bash benchmarks/methods_gpu.sh OUT [extra overrides...]
# Data: KD_DATA (default: data=folder data.root=$KD_DATA_ROOT). Then:
#   python -m kd.report OUT/* --out docs/results/methods
set -uo pipefail
OUT=$(realpath -m "$1"); shift
mkdir -p "$OUT"
PY=${PYTHON:-python3}
RUN="$(dirname "$(realpath "$0")")/../run.py"
D=${KD_DATA:-"data=folder data.root=${KD_DATA_ROOT:?set KD_DATA_ROOT or KD_DATA}"}
METHODS=${KD_METHODS:-"kd kd_std dkd cosine regressor"}
for m in $METHODS; do
  $PY "$RUN" experiment=seed_kd loss="$m" $D trainer.progress=false 'trial.seeds=[42,43,44]' "$@" \
    hydra.run.dir="$OUT/$m" >"$OUT/$m.log" 2>&1 &
done
wait
