"""README.md is a short manual whose result tables are generated from result JSON."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "docs" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_result_tables_are_what_the_result_json_says():
    tables = _tables()
    docs = Path(tables.__file__).parent
    assert set(docs.glob("*.md")) <= set(tables.DOCUMENTS)  # every page of docs/ is checked
    marked = set()
    for document in tables.DOCUMENTS:
        text = document.read_text()
        marked |= set(re.findall(r"<!-- table: ([\w-]+) -->", text))
        assert tables.render(text) == text, (
            f"{document} disagrees with the result JSON: run python docs/readme_tables.py"
        )
    assert marked == set(tables.TABLES)  # every table is shown somewhere
    assert tables.main(["--check"]) == 0


def test_a_changed_figure_is_caught(tmp_path):
    tables = _tables()
    text = README.read_text()
    tampered = text.replace("| Teacher | 1,186,986 |", "| Teacher | 1,186,987 |", 1)
    assert tampered != text and tables.render(tampered) != tampered
    copy = tmp_path / "README.md"
    copy.write_text(tampered)
    assert tables.main(["--check", "--readme", str(copy)]) == 1
    assert tables.main(["--readme", str(copy)]) == 0 and copy.read_text() == text


def test_an_unknown_table_is_an_error():
    with pytest.raises(KeyError, match="nonsense"):
        _tables().render("<!-- table: nonsense -->\n<!-- end table -->\n")


def test_the_readme_is_a_manual_of_at_most_300_lines_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


def _quick_start_commands() -> list[list[str]]:
    """The ``python run.py ...`` commands of the README's Quick start, as argument lists."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    joined = re.sub(r"\\\n\s*", "", section)  # a command continued over lines
    return [shlex.split(line.strip())[2:] for line in joined.splitlines() if line.strip().startswith("python run.py")]


def test_the_quick_start_commands_compose_and_the_timed_one_is_the_readmes(compose_cfg):
    commands = _quick_start_commands()
    assert len(commands) == 2
    for args in [*commands, ["experiment=seed_kd"]]:  # and the full study, named in the text
        cfg = compose_cfg(*args)
        assert cfg.trainer.epochs >= 1
    smoke, real = commands
    assert "loss=kd" in smoke and "loss=kd" in real  # the Quick start distils
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "benchmarks" / "quickstart.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert real == bench.ARGS  # the measured command is the README's, data.root aside
    measured = json.loads((REPO / "docs" / "results" / "quickstart" / "quickstart.json").read_text())
    assert measured["command"].split("data.root=PATH ", 1)[1] == " ".join(real)
