"""Answers a sweep can be trusted with: one teacher per recipe, no tuning on test, seeds."""

import dataclasses
import importlib
import json
import os
import sqlite3
import subprocess
import sys

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir

import kd.devices
from kd.config import default_study_name, experiment_settings
from kd.errors import CheckpointError
from kd.identity import key, source_digest
from kd.models import DeepNN
from kd.plan import resolve
from kd.provision import prepare_teacher
from kd.recipes import make_context, recipe_spec
from kd.report import report
from kd.storage import save_checked
from kd.teacher import TeacherStore, make_checkpoint
from tests.conftest import CONF, FAST, read_metrics, run_py

SMALL = ["data=synthetic", "data.train_size=96", "data.test_size=32", "data.val_size=16", "trainer.device=cpu"]


def teacher_address(compose_cfg, *overrides: str, device: str = "cpu") -> str:
    cfg = compose_cfg("loss=kd", *SMALL, *overrides)
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    ctx = dataclasses.replace(ctx, device=torch.device(device))  # recipe_spec reads only its type
    return key("model", **recipe_spec(resolve(cfg).teacher.recipe, ctx))


@pytest.mark.parametrize(
    "override",
    [
        "teacher.optim.lr=3e-3",
        "teacher.epochs=3",
        "teacher.batch_size=32",
        "teacher.seed=1",
        "teacher.augment=true",
        "model@teacher.model=student",
        "data.val_size=24",
        "data.split_seed=1",
        "data.seed=1",  # other image contents
        "data.mean=[0.5,0.5,0.5]",
    ],
)
def test_every_teacher_recipe_field_changes_the_address(compose_cfg, override):
    assert teacher_address(compose_cfg, override) != teacher_address(compose_cfg)


@pytest.mark.parametrize(
    "override",
    [
        "seed=7",
        "optim.lr=3e-3",
        "trainer.epochs=3",
        "trainer.batch_size=32",
        "loss.temperature=8",
        "loss.alpha=0.9",
        "trainer.amp=true",
        "trainer.num_threads=1",
        "trainer.channels_last=false",
        "trial.seeds=[1,2]",
    ],
)
def test_student_settings_never_change_the_teacher_address(compose_cfg, override):
    assert teacher_address(compose_cfg, override) == teacher_address(compose_cfg)


def test_teacher_amp_changes_the_address_exactly_where_autocast_runs(compose_cfg, monkeypatch):
    plain = teacher_address(compose_cfg)
    bf16 = teacher_address(compose_cfg, "teacher.amp=bf16")
    assert bf16 != plain  # autocast runs on CPU too
    assert teacher_address(compose_cfg, "teacher.amp=true") == bf16
    assert teacher_address(compose_cfg, "teacher.amp=off") == plain
    for native in (False, True):  # auto: whatever it resolved to on this device
        monkeypatch.setattr(kd.devices, "bf16_is_native", lambda device, native=native: native)
        assert teacher_address(compose_cfg, "teacher.amp=auto") == (bf16 if native else plain)
    assert teacher_address(compose_cfg, "teacher.amp=true", device="cuda") != teacher_address(
        compose_cfg, device="cuda"
    )


def test_editing_the_model_class_changes_its_source_digest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    digests = []
    for width in (8, 16):
        (tmp_path / "toy_net.py").write_text(
            f"import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
            f"        super().__init__()\n        self.fc = torch.nn.Linear(4, {width})\n"
        )
        sys.modules.pop("toy_net", None)
        importlib.invalidate_caches()
        digests.append(source_digest("toy_net.Net"))
    assert digests[0] != digests[1]
    # the same class's digest in another process with another hash seed: an address is stable
    code = "from kd.identity import source_digest; print(source_digest('kd.models.DeepNN'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == source_digest("kd.models.DeepNN")


def test_the_seed_teacher_run_publishes_the_address_seed_kd_looks_up(compose_cfg):
    teacher_run = compose_cfg("experiment=seed_teacher", *SMALL, "data.val_size=0")
    kd_run = compose_cfg("experiment=seed_kd", *SMALL, "data.val_size=0")
    ctx = make_context(resolve(teacher_run), torch.device("cpu"))
    published = recipe_spec(resolve(teacher_run).student, ctx)
    assert key("model", **published) == key("model", **recipe_spec(resolve(kd_run).teacher.recipe, ctx))


def _checkpoint_trained_without_validation(compose_cfg, path):
    cfg_all = compose_cfg(*SMALL, "data.val_size=0")
    ctx_all = make_context(resolve(cfg_all), torch.device("cpu"))
    torch.manual_seed(0)
    spec = recipe_spec(resolve(cfg_all).teacher.recipe, ctx_all)
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10, spec=spec), path)


def test_a_teacher_that_saw_the_validation_images_is_refused(compose_cfg, tmp_path):
    path = tmp_path / "all_images.pt"
    _checkpoint_trained_without_validation(compose_cfg, path)
    cfg = compose_cfg("loss=kd", *SMALL, f"teacher.checkpoint={path}")
    with pytest.raises(CheckpointError, match="trained on this run's validation images"):
        prepare_teacher(make_context(resolve(cfg), torch.device("cpu")), TeacherStore(tmp_path / "s"))
    # Without a validation split there is nothing to leak: the same file is fine.
    cfg_no_val = compose_cfg("loss=kd", *SMALL, "data.val_size=0", f"teacher.checkpoint={path}")
    source = prepare_teacher(make_context(resolve(cfg_no_val), torch.device("cpu")), TeacherStore(tmp_path / "s"))
    assert "teacher_warning" not in source.info


def test_a_checkpoint_with_no_recorded_split_is_used_with_a_warning(compose_cfg, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(DeepNN().state_dict(), path)
    cfg = compose_cfg("loss=kd", *SMALL, f"teacher.checkpoint={path}")
    source = prepare_teacher(make_context(resolve(cfg), torch.device("cpu")), TeacherStore(tmp_path / "s"))
    assert "records no training split" in source.info["teacher_warning"]


def _sweep_root(*overrides: str):
    import kd.config  # noqa: F401  (registers the study-name resolver)

    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=["hparams_search=kd", *overrides], return_hydra_config=True)


def test_default_study_name_follows_the_unswept_settings():
    base = _sweep_root("data=synthetic")
    name = default_study_name(_root_=base)
    assert name.startswith("kd_optuna-")  # hparams_search=kd keeps the name it had as kd_optuna: studies resume
    with initialize_config_dir(config_dir=str(CONF)):
        old = compose(
            config_name="config", overrides=["hparams_search=kd_optuna", "data=synthetic"], return_hydra_config=True
        )
    assert default_study_name(_root_=old) == name
    assert default_study_name(_root_=_sweep_root("data=synthetic", "data.num_classes=5")) != name
    # The swept keys' own values are not part of the experiment's identity.
    assert default_study_name(_root_=_sweep_root("data=synthetic", "loss.temperature=9")) == name
    assert "loss.temperature" not in experiment_settings(base) and "data.num_classes" in experiment_settings(base)


@pytest.mark.slow
def test_a_three_seed_kd_multirun_trains_exactly_one_teacher(workdir):
    proc = run_py(["-m", *FAST, "loss=kd", "seed=1,2,3", "hydra.sweep.dir=sweep"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [read_metrics(workdir / "sweep" / str(i)) for i in range(3)]
    assert len({r["teacher_checkpoint"] for r in runs}) == 1
    assert sorted(r["teacher_source"] for r in runs) == ["store", "store", "trained"]


@pytest.mark.slow
def test_a_three_seed_trial_records_each_seed_and_the_paired_difference(workdir):
    proc = run_py([*FAST, "loss=kd", "trial.seeds=[1,2,3]", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(workdir / "out")
    assert [s["seed"] for s in m["per_seed"]] == [1, 2, 3] and m["seeds"] == [1, 2, 3]
    vals = [s["val_acc"] for s in m["per_seed"]]
    assert m["val_acc"] == pytest.approx(sum(vals) / 3) and m["objective_value"] == m["val_acc"]
    assert m["val_acc_se"] == pytest.approx(torch.tensor(vals).std().item() / 3**0.5)
    diffs = [s["val_acc"] - s["baseline"]["val_acc"] for s in m["per_seed"]]
    assert m["kd_minus_ce"]["val_acc"]["diffs"] == pytest.approx(diffs)
    # The 95 % t interval with 2 degrees of freedom, computed independently.
    mean, se = sum(diffs) / 3, torch.tensor(diffs, dtype=torch.float64).std().item() / 3**0.5
    assert m["kd_minus_ce"]["val_acc"]["ci95"] == pytest.approx([mean - 4.302653 * se, mean + 4.302653 * se])
    assert all((workdir / "out" / f"model_seed{s}.pt").is_file() for s in (1, 2, 3))
    # The baselines are stored: a second run reuses them instead of training again.
    again = run_py([*FAST, "loss=kd", "loss.alpha=0.5", "trial.seeds=[1,2,3]", "hydra.run.dir=out2"], cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    m2 = read_metrics(workdir / "out2")
    assert [s["baseline"]["source"] for s in m2["per_seed"]] == ["store"] * 3
    assert [s["baseline"]["val_acc"] for s in m2["per_seed"]] == [s["baseline"]["val_acc"] for s in m["per_seed"]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["data.val_size=0"], ["experiment=seed_kd"]])
def test_a_sweep_that_would_select_on_test_is_refused(workdir, extra):
    fast = [a for a in FAST if not a.startswith("data.val_size")]
    proc = run_py(["-m", "hparams_search=kd", *fast, *extra, "hydra.sweep.dir=sweep"], cwd=workdir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kd_optuna: error:") and "data.val_size=0" in lines[-1]
    assert "objective=test_acc" in lines[-1]
    assert not any((workdir / "sweep").glob("[0-9]*"))  # no trial ran


@pytest.mark.slow
def test_naming_the_test_objective_explicitly_allows_it(workdir):
    args = ["-m", "hparams_search=kd", *FAST, "data.val_size=0", "objective=test_acc"]
    proc = run_py([*args, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=sweep"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(workdir / "sweep" / "0")
    assert m["objective"] == "test_acc" and m["objective_value"] == m["test_acc"]


@pytest.mark.slow
def test_resuming_a_study_with_other_settings_is_refused(workdir):
    args = ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.study_name=mine", "hydra.sweeper.n_trials=1"]
    first = run_py(args, cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_py([*args, "hydra.sweeper.n_trials=2", "data.num_classes=5"], cwd=workdir)
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: study mine") and "data.num_classes" in last and "study_name" in last
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{workdir}/multirun/mine/optuna.db")
    assert len(study.trials) == 1
    assert study.user_attrs["kd:settings"]["data.num_classes"] == 10


@pytest.mark.slow
def test_report_groups_by_every_setting_but_the_seed(workdir):
    proc = run_py(["-m", *FAST, "optim.lr=1e-3,1e-2", "seed=1,2", "hydra.sweep.dir=sweep"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = report([workdir / "sweep"], workdir / "report")
    rows = summary["rows"]
    assert len(rows) == 2 and all(r["seeds"] == [1, 2] for r in rows)
    assert sorted(r["differs"]["optim.lr"] for r in rows) == [1e-3, 1e-2]
    assert "optim.lr=0.01" in (workdir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_sweep_report_orders_by_the_objective_and_hides_voided_trials(workdir):
    args = ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=sw"]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # As the sweeper voids a trial whose result was lost: FAIL, though its folder remains.
    with sqlite3.connect(workdir / "sw" / "optuna.db") as db:
        db.execute("UPDATE trials SET state = 'FAIL' WHERE number = 0")
    assert (workdir / "sw" / "0" / "metrics.json").exists()
    summary = report([workdir / "sw"], workdir / "out")
    (sweep,) = summary["sweeps"]
    trials = [r["trial"] for r in sweep["rows"]]
    assert 0 not in trials and len(trials) == 2
    values = [r["objective_value"] for r in sweep["rows"]]
    assert values == sorted(values, reverse=True)
    assert [r["selected"] for r in sweep["rows"]] == [True, False]
    assert sweep["rows"][0]["test_acc"]["mean"] is not None and sweep["rows"][1]["test_acc"] is None
    assert summary["rows"] == []  # trial folders are reported from the study, not pooled as runs
    text = json.dumps(summary)
    assert "★" not in text  # the mark is for the markdown only
    assert "★" in (workdir / "out" / "report.md").read_text()


@pytest.mark.slow
def test_resuming_with_a_swept_key_now_fixed_is_refused(workdir):
    args = ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.study_name=fix", "hydra.sweeper.n_trials=1"]
    assert run_py(args, cwd=workdir).returncode == 0
    second = run_py([*args, "hydra.sweeper.n_trials=2", "loss.alpha=0.5"], cwd=workdir)
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: study fix was run with another search space")
    assert "swept loss.alpha" in last and "fixed loss.alpha: <unset> -> 0.5" in last
    study = optuna.load_study(study_name="fix", storage=f"sqlite:///{workdir}/multirun/fix/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.slow
def test_kd_pareto_trades_accuracy_against_flops_over_width(workdir):
    args = ["-m", "hparams_search=kd_pareto", *FAST, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=sw"]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workdir}/sw/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        m = read_metrics(workdir / "sw" / str(t.number))
        assert t.values == [pytest.approx(m["val_acc"]), m["flops"]] and m["objective"] == ["val_acc", "flops"]
        assert m["settings"]["model.width"] == t.params["model.width"]
    # The width moves the cost: FLOPs grow with it (LightNN's are quadratic in the width).
    by_width = sorted((t.params["model.width"], t.values[1]) for t in study.trials)
    assert [f for _, f in by_width] == sorted(f for _, f in by_width) and by_width[0][1] < by_width[-1][1]
    summary = report([workdir / "sw"], workdir / "out")
    (sweep,) = summary["sweeps"]
    assert {r["trial"] for r in sweep["pareto_front"]} == {t.number for t in study.best_trials}
    assert sweep["objective"] == ["val_acc", "flops"] and sweep["directions"] == ["maximize", "minimize"]
    assert "pareto_front.png" in summary["plots"]
