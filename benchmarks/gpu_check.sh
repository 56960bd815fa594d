#!/usr/bin/env bash
# One prepared GPU check (the lent device machine): the side-by-side benchmark on
# 50,000 synthetic CIFAR-shaped images, then a 2-job joblib Optuna sweep on the GPU.
# Hydra/Optuna are carried as wheels in .whl/ (the machine has torch but not them).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 KD_CACHE_DIR=/tmp/kdcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 python3 benchmarks/bench_kd.py --synthetic --sweep-trials 3 --sweep-epochs 2 --threads 16 \
  --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
timeout 150 python3 run.py -m hparams_search=kd data=synthetic data.train_size=20000 data.test_size=2000 \
  data.val_size=2000 trainer.epochs=2 trainer.progress=false hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  hydra.sweeper.n_jobs=2 hydra.sweeper.n_trials=4 hydra.sweeper.study_name=gpu2 hydra.sweep.dir=/tmp/gpusweep \
  > "$OUT/sweep_gpu.log" 2>&1
echo "sweep exit $?" | tee -a "$OUT/sweep_gpu.log"
python3 - <<'PY' | tee "$OUT/sweep_gpu_jobs.txt"
import json, pathlib
for p in sorted(pathlib.Path("/tmp/gpusweep").glob("*/metrics.json")):
    m = json.loads(p.read_text())
    print(p.parent.name, m["device"], m.get("teacher_source"), m.get("teacher_signal"), round(m["train_seconds"], 2), m["val_acc"])
PY
