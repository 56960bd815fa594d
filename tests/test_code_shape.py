"""The shape the code keeps: short functions, each formula in one place."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "kd").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py"), REPO / "run.py"])


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in SOURCES
        for node in _functions(path)
        if node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long


def test_the_population_has_no_loss_or_optimiser_formula_of_its_own():
    source = (REPO / "kd" / "population.py").read_text()
    for formula in ("log_softmax", "kl_div", "cross_entropy", "exp_avg", "lerp_", "addcmul_", "HANDOFF"):
        assert formula not in source, formula
    assert "train_step(" in source and "for_members(" in source and "new_optimizer(" in source
