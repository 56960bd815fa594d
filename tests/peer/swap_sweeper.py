"""Copy the upstream hydra-optuna-sweeper test suite and point it at kd_optuna.

    python tests/peer/swap_sweeper.py SRC DEST

SRC is ../shared/peer/hydra-optuna-sweeper-1.4.0rc3 (never edited); DEST receives a
copy in which every selection of the stock sweeper names ours instead, as the peer
README describes: ``override hydra/sweeper: optuna`` in the YAML files,
``hydra/sweeper=optuna`` in the test file, and the implementation class the tests
build directly.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

OUR_IMPL = "__import__('hydra_plugins.kd_sweeper.kd_sweeper', fromlist=['_']).KDOptunaSweeperImpl"


def swap(src: Path, dest: Path) -> list[Path]:
    """Copy ``src`` to ``dest`` with the sweeper swapped; returns the files changed."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    for path in dest.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    changed = []
    for path in [*dest.glob("example/**/*.yaml"), *dest.glob("tests/conf/*.yaml")]:
        text = path.read_text()
        new = re.sub(r"override hydra/sweeper: optuna\b", "override hydra/sweeper: kd_optuna", text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    test_file = dest / "tests" / "test_optuna_sweeper_plugin.py"
    text = test_file.read_text()
    new = re.sub(r"hydra/sweeper=optuna\b", "hydra/sweeper=kd_optuna", text)
    new = new.replace("_impl.OptunaSweeperImpl", OUR_IMPL)
    if new != text:
        test_file.write_text(new)
        changed.append(test_file)
    return changed


if __name__ == "__main__":
    for changed_file in swap(Path(sys.argv[1]), Path(sys.argv[2])):
        print(changed_file)
