"""``python -m kd.report`` on tiny synthetic multiruns and sweeps."""

import json
import re
import shutil

import pytest

from kd.report import main, report
from tests.conftest import FAST, run_py

pytestmark = pytest.mark.slow


def test_multirun_table_pools_seeds_and_lists_skipped_runs(workdir):
    proc = run_py(["-m", *FAST, "loss=ce,kd", "seed=1,2", "hydra.sweep.dir=sweep"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diverged = run_py([*FAST, "optim.lr=1e30", "trainer.check_every=1", "hydra.run.dir=sweep/nan"], cwd=workdir)
    assert diverged.returncode == 3
    shutil.copytree(workdir / "sweep" / "0" / ".hydra", workdir / "sweep" / "unfinished" / ".hydra")

    summary = report([workdir / "sweep"], workdir / "report")
    rows = {r["label"]: r for r in summary["rows"]}
    assert set(rows) == {"Student", "Student + KD (T=2, α=0.25)"}
    runs = [json.loads(p.read_text()) for p in (workdir / "sweep").glob("[0-9]/metrics.json")]
    for name, loss in [("Student", "ce"), ("Student + KD (T=2, α=0.25)", "kd")]:
        accs = [r["test_acc"] for r in runs if r["loss"] == loss]
        assert rows[name]["seeds"] == [1, 2]
        assert rows[name]["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
        assert rows[name]["test_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
        assert rows[name]["test_acc"]["se"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    reasons = {s["run_dir"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped"]}
    assert reasons["nan"].startswith("diverged at epoch 1")
    assert reasons["unfinished"].startswith("no metrics.json")
    table = (workdir / "report" / "report.md").read_text()
    assert re.search(r"\| Student \| — \| 267,738 \| 2\.59 M \| [0-9.]+ ms \| 1, 2 \|", table)
    assert " ± " in table and "Skipped 2 run(s)" in table


def test_sweep_report_writes_every_plot(workdir, capsys):
    proc = run_py(
        ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=optuna_sweep"],
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(workdir / "optuna_sweep"), "--out", str(workdir / "out")]) == 0
    for name in ["objective_vs_temperature", "objective_vs_alpha", "optimization_history", "param_importances"]:
        png = workdir / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name}.png)" in (workdir / "out" / "report.md").read_text()
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    (sweep,) = summary["sweeps"]
    assert summary["runs"] == 0 and len(sweep["rows"]) == 3 and sweep["selected_trial"] is not None
    assert any("importances come from 3 completed trials" in n and "rough guide" in n for n in summary["notes"])


def test_missing_directory_is_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("kd.report: error: not a directory")


@pytest.mark.parametrize("content", [b"", b"not a database at all"], ids=["empty", "garbage"])
def test_a_damaged_study_file_is_named_and_never_written_into(tmp_path, capsys, content):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "optuna.db").write_bytes(content)
    before = sorted(p.name for p in sweep.iterdir())
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert f"{sweep / 'optuna.db'} is " in printed and "left out" in printed
    assert (sweep / "optuna.db").read_bytes() == content and sorted(p.name for p in sweep.iterdir()) == before
    assert (tmp_path / "sweep.report" / "report.md").exists()


def test_a_sweep_with_a_metrics_json_cut_short_or_a_damaged_journal_is_reported_in_notes(workdir, capsys):
    storage = f"journal://{workdir}/study.log"
    args = ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=sw"]
    assert run_py([*args, f"hydra.sweeper.storage={storage}"], cwd=workdir).returncode == 0
    metrics = workdir / "sw" / "0" / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[: metrics.stat().st_size // 2])  # a write cut short
    assert main([str(workdir / "sw"), "--out", str(workdir / "r1")]) == 0
    assert "the metrics.json of trial(s) 0 cannot be read (cut short?)" in capsys.readouterr().out
    journal = workdir / "study.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:2], b"garbage\n", *lines[2:]]))
    before = journal.read_bytes()
    assert main([str(workdir / "sw"), "--out", str(workdir / "r2")]) == 0
    assert "is damaged at line 3" in capsys.readouterr().out and journal.read_bytes() == before


def test_the_report_counts_failed_trials_as_the_sweeper_does(tmp_path):
    """Surplus trials and trials failed by a heartbeat (no reason) are no trials of the
    sweep: the report's failed count is the sweeper's n_failed, not every FAIL."""
    import optuna
    from optuna.trial import TrialState

    from hydra_plugins.kd_sweeper.study import ERROR, FAIL_REASON, SURPLUS, counted_trials
    from kd.sweep_report import sweep_markdown, sweep_table

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    for reason in (f"{ERROR}: ValueError", SURPLUS, None):
        trial = study.ask()
        if reason is not None:
            trial.set_user_attr(FAIL_REASON, reason)
        study.tell(trial, state=TrialState.FAIL)
    study.tell(study.ask(), 1.0)
    swept_failed = sum(1 for t in counted_trials(study) if t.state == TrialState.FAIL)
    sweep = sweep_table(tmp_path, study)
    assert swept_failed == 1 and sweep["failed"] == swept_failed
    assert sweep["failures"] == [{"trial": 0, "reason": f"{ERROR}: ValueError"}]  # why it failed, too
    assert f"\n- trial 0 failed: {ERROR}: ValueError\n" in sweep_markdown(sweep)
    sweep["failures"] = []
    assert "failed:" not in sweep_markdown(sweep)
