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


def test_no_module_is_longer_than_450_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in SOURCES if (n := len(p.read_text().splitlines())) > 450]
    assert not long, long


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: list[Path] = SOURCES, root: Path = REPO) -> dict[str, set[str]]:
    """Which project modules each project module imports, at the top or inside a
    function (``from kd import x`` counts as importing ``kd.x`` where that is a module)."""
    modules = {_module_name(p, root): p for p in sources}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # a relative import
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *filter(None, [base])])
                targets = [f"{base}.{alias.name}" for alias in node.names]  # a name, not a module: base
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if (found := visit(nxt, [*path, node])) is not None:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if (found := visit(start, [])) is not None:
            return found
    return None


def test_the_imports_have_no_cycle_and_point_one_way():
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # The sweeper plugin is app-agnostic: it never imports kd. Nothing imports run.py.
    plugin = {m for m in graph if m.startswith("hydra_plugins.kd_sweeper")}
    assert not [(m, t) for m in plugin for t in graph[m] if t.startswith("kd")]
    assert not [m for m, targets in graph.items() if "run" in targets]
    # One run's orchestration sits on top: nothing in kd builds on it, populations included.
    assert not [m for m, targets in graph.items() if "kd.pipeline" in targets and m != "run"]


def test_the_import_graph_test_sees_cycles_and_function_level_imports(tmp_path):
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "__init__.py").write_text("")
    (tmp_path / "kd" / "a.py").write_text("from kd.b import f\n")
    (tmp_path / "kd" / "b.py").write_text("def f():\n    from kd import a\n")
    (tmp_path / "kd" / "c.py").write_text("from . import b\n")
    graph = import_graph(sorted((tmp_path / "kd").glob("*.py")), root=tmp_path)
    assert graph["kd.a"] == {"kd.b"} and graph["kd.b"] == {"kd.a"} and graph["kd.c"] == {"kd.b"}
    assert _cycle(graph) == ["kd.a", "kd.b", "kd.a"]
    assert _cycle({"kd.a": {"kd.b"}, "kd.b": set()}) is None


def test_no_function_starts_with_a_blank_line_where_its_docstring_would_be():
    blank = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        blank += [
            f"{path.relative_to(REPO)}:{f.lineno} {f.name}"
            for f in _functions(path)
            if not lines[f.body[0].lineno - 2].strip()
        ]
    assert not blank, blank


# The composed config is resolved once (kd.plan.resolve). Only these modules may hold it:
# the entry points and orchestrators, the checks, the resolver, the sweep hook, and
# kd.export (which reads a finished run's saved config.yaml). Everything else reads the plan.
CONFIG_READERS = {
    "run",
    "kd.pipeline",
    "kd.population_jobs",
    "hydra_plugins.kd_population.population_launcher",
    "kd.plan",
    "kd.config",
    "kd.schema",
    "kd.tuning",
    "kd.export",
}
RESOLVER = "kd.plan"  # reads each setting once, through kd.config's helpers
MAX_HANDOFFS = 10  # issue 42: the config handed on at most 10 times (35 before the plan)


def _holds_config(node: ast.AST) -> bool:
    """``cfg``, or an attribute ``.cfg`` (a context carrying the config)."""
    return (isinstance(node, ast.Name) and node.id == "cfg") or (isinstance(node, ast.Attribute) and node.attr == "cfg")


def config_handoffs(sources: list[Path] = SOURCES, root: Path = REPO) -> list[str]:
    """Every call that hands the whole config to a function of another project module:
    ``module:line function -> its module``."""
    found = []
    for path in sources:
        tree = ast.parse(path.read_text())
        imported: dict[str, str] = {}  # local name -> the project module it came from
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("kd", "hydra_plugins"):
                imported.update({alias.asname or alias.name: str(node.module) for alias in node.names})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.id if isinstance(func, ast.Name) else name
            if name in imported and any(_holds_config(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                found.append(f"{_module_name(path, root)}:{node.lineno} {ast.unparse(func)} -> {imported[name]}")
    return sorted(found)


def test_below_the_orchestrators_no_module_reads_the_config():
    # The sweeper plugin is not kd's: the config it reads is any app's.
    kd_sources = [p for p in SOURCES if "kd_sweeper" not in p.parts]
    readers = {
        _module_name(path, REPO)
        for path in kd_sources
        if any(_holds_config(node) for node in ast.walk(ast.parse(path.read_text())))
    }
    assert readers - CONFIG_READERS == set(), sorted(readers - CONFIG_READERS)


def test_the_config_is_handed_on_at_most_ten_times_outside_the_resolver():
    handoffs = [h for h in config_handoffs() if not h.startswith(RESOLVER + ":")]
    assert len(handoffs) <= MAX_HANDOFFS, "\n".join(handoffs)


def test_the_handoff_trace_sees_calls_with_the_config_or_a_context_holding_it(tmp_path):
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "a.py").write_text(
        "from kd.b import f, g\n"
        "from kd import c\n"
        "def run(cfg, ctx):\n"
        "    f(cfg)\n"
        "    g(1, x=ctx.cfg)\n"
        "    c.h(cfg.model)\n"  # one node of it: not the whole config
        "    len(cfg)\n"  # not a project function
    )
    assert config_handoffs([tmp_path / "kd" / "a.py"], root=tmp_path) == ["kd.a:4 f -> kd.b", "kd.a:5 g -> kd.b"]
