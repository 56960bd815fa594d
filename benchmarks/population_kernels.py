"""Run the population-equivalence test with CPU kernels forced each way.

Issue 41 asks that the population test's tolerance hold whatever kernels a CPU picks.
This runs `tests/test_population.py::test_a_population_trains_each_member_as_its_single_run_would`
with oneDNN on and off and with 1 and 2 intra-op threads, each in its own process, and
writes what pytest said for each:

    python benchmarks/population_kernels.py --out docs/results/performance/population_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kd.cost import device_name

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_population.py::test_a_population_trains_each_member_as_its_single_run_would"
# Set in the child before pytest imports the tests; conftest pins threads only under xdist.
CHILD = """
import sys, torch, pytest
torch.backends.mkldnn.enabled = {onednn}
torch.set_num_threads({threads})
sys.exit(pytest.main(["-q", "-n", "0", "-p", "no:randomly", "-p", "no:cacheprovider", {test!r}]))
"""


def run_case(onednn: bool, threads: int) -> dict:
    code = CHILD.format(onednn=onednn, threads=threads, test=TEST)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "onednn": onednn,
        "threads": threads,
        "exit_code": proc.returncode,
        "pytest": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases = []
    for onednn in (True, False):
        for threads in (1, 2):
            case = run_case(onednn, threads)
            print(json.dumps(case))
            cases.append(case)
    record = {
        "command": "python benchmarks/population_kernels.py --out " + str(args.out),
        "device": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "test": TEST,
        "cases": cases,
        "all_passed": all(c["exit_code"] == 0 for c in cases),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("all passed" if record["all_passed"] else "FAILED", "->", args.out)


if __name__ == "__main__":
    main()
