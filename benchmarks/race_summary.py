"""Summarise a finished racing sweep of kd into one small JSON for docs/: the sweeper's
answer (optimization_results.yaml's ``racing``) and, for the confirmed setting and the
reference on the confirmation seeds, each seed's validation and test accuracy and its
paired KD - CE difference (trial.baseline), with mean, SE and 95 % intervals.

    python benchmarks/race_summary.py /work/runs/race_student_long docs/results/racing/cifar_student_long.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.stats import describe, paired_difference  # noqa: E402


def seeds_of(sweep: Path, trial: int, seeds: list[int]) -> dict:
    runs = [json.loads((sweep / str(trial) / f"seed_{s}" / "metrics.json").read_text()) for s in seeds]
    out: dict = {"seeds": seeds}
    for split in ("val_acc", "test_acc"):
        kd = [r[split] for r in runs]
        ce = [r["baseline"][split] for r in runs]
        out[split] = {"kd": kd, "ce": ce, "kd_summary": describe(kd), "kd_minus_ce": paired_difference(kd, ce)}
    return out


def main(argv: list[str]) -> int:
    sweep, out = Path(argv[0]), Path(argv[1])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    racing = results["racing"]
    confirm = racing["confirmation"]["seeds"]
    record = {
        "command": "python run.py -m hparams_search=kd_race experiment=student_long data=folder "
        "data.root=../shared/data/cifar10-jpeg hydra.sweeper.racing.budget=10 hydra.sweeper.n_trials=10",
        "machine": "2-core CPU (this project's machine), float32",
        "data": "CIFAR-10 JPEG q75 copy: 45,000 train / 5,000 validation / 10,000 test",
        "racing": racing,
        "confirmed": seeds_of(sweep, racing["incumbent"]["trial"], confirm),
        "reference": seeds_of(sweep, racing["reference"]["trial"], confirm) if "reference" in racing else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
