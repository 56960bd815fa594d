"""Population training: N students trained together equal N single runs."""

from __future__ import annotations

import json
import logging
import re

import optuna
import pytest
import torch
from conftest import FAST, read_metrics, run_py
from optuna.trial import TrialState

from kd.errors import Diverged, Pruned
from kd.plan import resolve
from kd.population import Member, population_key, train_population
from kd.population_jobs import seed_reporter
from kd.provision import prepare_teacher
from kd.recipes import make_context, train_model
from kd.teacher import TeacherStore

SMALL = [
    "data=synthetic",
    "data.train_size=224",
    "data.test_size=64",
    "data.val_size=32",
    "data.noise=120",  # hard enough that accuracies differ between members
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "teacher.epochs=1",
]


def _members(compose_cfg, tmp_path, settings: list[list[str]]):
    cfgs = [compose_cfg(*SMALL, f"paths.store_dir={tmp_path}/s", *extra) for extra in settings]
    ctx = make_context(resolve(cfgs[0]), torch.device("cpu"))
    loss = resolve(cfgs[0]).new_loss()
    store = TeacherStore(tmp_path / "s")
    teacher = prepare_teacher(ctx, store, tuple(loss.teacher_features)) if loss.needs_teacher else None
    members = [Member(resolve(c).student, resolve(c).new_loss()) for c in cfgs]
    return cfgs, ctx, teacher, members


# Population and single run are compared in float64. In float32 their kernels round
# differently (a stacked convolution is not the plain one), and training amplifies that
# by amounts that depend on the CPU: Adam turns a rounding-size gradient into an lr-size
# step, a ReLU or max-pool tie goes the other way (up to 2e-3 relative after 2 epochs on
# an AMD EPYC, 3e-3 on an Intel Xeon with AMX, for one DKD/SGD member). float64 has no
# reduced-precision kernels on any CPU and a unit roundoff of 1.1e-16: the tolerance
# leaves training room to amplify rounding ten-million-fold (seen: 100-fold, 1e-14),
# while one member taking another's dropout masks moves the weights by 3e-2 to 3e-1.
TOLERANCE = 1e7 * torch.finfo(torch.float64).eps


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _assert_same(single, member) -> None:
    for (name, a), b in zip(single.model.named_parameters(), member.model.parameters(), strict=True):
        assert a.dtype == b.dtype == torch.float64, name
        assert (b - a).norm() <= TOLERANCE * a.norm(), f"{name}: relative difference {(b - a).norm() / a.norm():.2e}"
    for entry_single, entry_member in zip(single.fit.history, member.fit.history, strict=True):
        assert set(entry_member) - {"population"} == set(entry_single)
        for key in ("train_loss", "lr", "val_acc"):
            assert entry_member[key] == pytest.approx(entry_single[key], rel=TOLERANCE, abs=TOLERANCE)
    assert member.test_acc == single.test_acc


@pytest.mark.parametrize(
    "settings",
    [
        # KD: each member its own seed, temperature, alpha and learning rate
        [
            ["loss=kd", "loss.temperature=2", "loss.alpha=0.5", "optim.lr=1e-3", "seed=1"],
            ["loss=kd", "loss.temperature=4", "loss.alpha=0.9", "optim.lr=3e-3", "seed=2"],
            ["loss=kd", "loss.temperature=1", "loss.alpha=0.0", "optim.lr=2e-3", "seed=3"],
        ],
        # CE with augmentation, AdamW weight decay and a one-cycle schedule per member
        [
            ["data.augment=true", "optim=adamw", "schedule=onecycle", "optim.lr=2e-3", "seed=5"],
            ["data.augment=true", "optim=adamw", "schedule=onecycle", "optim.lr=5e-3", "seed=6"],
        ],
        # DKD with SGD (momentum, Nesterov, weight decay), each member its own beta and lr
        [
            ["loss=dkd", "optim=sgd", "loss.beta=2", "optim.lr=0.01", "seed=7"],
            ["loss=dkd", "optim=sgd", "loss.beta=8", "optim.lr=0.03", "loss.temperature=2", "seed=8"],
        ],
        # Logit-standardised KD, members differing in their AdamW weight decay too
        [
            ["loss=kd_std", "optim=adamw", "optim.weight_decay=0.01", "seed=1"],
            ["loss=kd_std", "optim=adamw", "optim.weight_decay=0.3", "loss.temperature=3", "seed=2"],
        ],
        # The hidden-representation loss: student features through the stacked forward
        [
            ["loss=cosine", "loss.weight=0.25", "seed=3"],
            ["loss=cosine", "loss.weight=0.75", "seed=4"],
        ],
    ],
    ids=["kd-adam", "ce-augmented-adamw-onecycle", "dkd-sgd", "kd_std-adamw", "cosine"],
)
def test_a_population_trains_each_member_as_its_single_run_would(compose_cfg, tmp_path, settings, float64):
    # The student keeps its dropout: each member draws the masks its single run draws.
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, settings)
    assert len({population_key(resolve(c)) for c in cfgs}) == 1 and population_key(resolve(cfgs[0])) is not None
    outcomes = train_population(members, ctx, teacher)
    for cfg, member in zip(cfgs, outcomes, strict=True):
        single = train_model(resolve(cfg).student, resolve(cfg).new_loss(), ctx, teacher=teacher)
        _assert_same(single, member)


def test_a_member_trained_with_another_members_dropout_masks_fails_the_comparison(
    compose_cfg, tmp_path, float64, monkeypatch
):
    """The tolerance is tight enough to see the bug it guards against: members 1 and 2
    swap their dropout generators in the population, and the comparison fails."""
    import kd.recipes

    settings = [["optim.lr=2e-3", "seed=1"], ["optim.lr=2e-3", "seed=2"]]
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, settings)
    own = kd.recipes.dropout_generator
    monkeypatch.setattr(kd.recipes, "dropout_generator", lambda seed, device: own(3 - seed, device))
    outcomes = train_population(members, ctx, teacher)
    monkeypatch.setattr(kd.recipes, "dropout_generator", own)
    single = train_model(resolve(cfgs[0]).student, resolve(cfgs[0]).new_loss(), ctx, teacher=teacher)
    with pytest.raises(AssertionError, match="relative difference"):
        _assert_same(single, outcomes[0])


def test_members_draw_their_own_dropout_masks(compose_cfg, tmp_path):
    """Two members of the same seed stay identical; without per-member masks (one
    shared random draw across the stack) they would drift apart."""
    settings = [["optim.lr=2e-3", "seed=4"], ["optim.lr=2e-3", "seed=4"]]
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, settings)
    first, second = train_population(members, ctx, teacher)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_loss_with_trainable_parts_runs_alone(compose_cfg):
    assert population_key(resolve(compose_cfg("loss=regressor"))) is None
    assert population_key(resolve(compose_cfg("loss=kd", "trainer.amp=true"))) is None
    assert population_key(resolve(compose_cfg("loss=kd", "trainer.amp=auto"))) is None
    assert population_key(resolve(compose_cfg("loss=kd", "trainer.amp=off"))) is not None


def test_a_diverging_member_stops_alone(compose_cfg, tmp_path, float64):
    settings = [["optim.lr=1e-3", "seed=1"], ["optim.lr=1e30", "seed=2"], ["optim.lr=2e-3", "seed=3"]]
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, settings)
    outcomes = train_population(members, ctx, teacher)
    assert isinstance(outcomes[1], Diverged) and outcomes[1].epoch == 1
    for index in (0, 2):  # the others went on, unchanged by their diverged neighbour
        cfg = cfgs[index]
        _assert_same(train_model(resolve(cfg).student, resolve(cfg).new_loss(), ctx), outcomes[index])


def test_only_jobs_that_differ_in_member_keys_share_a_population(compose_cfg):
    from hydra_plugins.kd_population.population_launcher import plan_groups

    jobs = [
        compose_cfg("loss=kd", "loss.temperature=2", "seed=1"),
        compose_cfg("loss=kd", "loss.temperature=4", "loss.alpha=0.9", "optim.lr=0.01", "trial.seeds=[1,2,3]"),
        compose_cfg("loss=kd", "trainer.epochs=3"),  # another recipe: another population
        compose_cfg("loss=dkd"),  # another method: another population
        compose_cfg("loss=kd", "optim=sgd"),  # another optimiser: the same population (one each)
        compose_cfg("loss=kd", "trainer.epochs=3", "seed=9"),
        compose_cfg("loss=regressor"),  # trainable loss parts: alone
        compose_cfg("loss=kd", "data.augment=true"),  # another recipe
    ]
    assert population_key(resolve(jobs[6])) is None
    assert plan_groups(jobs, max_members=64) == [[0, 1, 4], [2, 5], [3], [6], [7]]
    assert plan_groups(jobs, max_members=3) == [[0], [1], [2, 5], [3], [4], [6], [7]]  # job 1 brings three seeds


@pytest.mark.slow
def test_the_population_launcher_writes_what_the_basic_launcher_writes(workdir):
    grid = ["-m", *FAST, "loss=kd", "loss.temperature=1,4", "trial.seeds=[1,2]", "trainer.epochs=2"]
    basic = run_py([*grid, "hydra.sweep.dir=basic"], cwd=workdir)
    assert basic.returncode == 0, basic.stderr[-3000:]
    pop = run_py([*grid, "hydra/launcher=population", "hydra.sweep.dir=pop"], cwd=workdir)
    assert pop.returncode == 0, pop.stderr[-3000:]
    assert "in 1 population(s) of sizes [2]" in pop.stdout + pop.stderr
    for job in ("0", "1"):
        a, b = read_metrics(workdir / "basic" / job), read_metrics(workdir / "pop" / job)
        assert set(a) == set(b) and a["settings"] == b["settings"] and a["seeds"] == b["seeds"] == [1, 2]
        for key in ("val_acc", "test_acc"):
            assert b[key] == pytest.approx(a[key], abs=1.0)
        assert b["kd_minus_ce"]["val_acc"]["n"] == 2 and b["per_seed"][1]["baseline"]["source"] == "store"
        assert (workdir / "pop" / job / "model_seed2.pt").exists() and (workdir / "pop" / job / ".hydra").is_dir()
        # The launcher handed each job its members: the job trained nothing itself.
        assert "epoch 1/2: loss" in (workdir / "basic" / job / "run.log").read_text()
        assert "epoch 1/2: loss" not in (workdir / "pop" / job / "run.log").read_text()


@pytest.mark.slow
def test_an_optuna_sweep_on_the_population_launcher_prunes_and_completes(workdir):
    from test_optuna_features import PRUNING

    args = [*PRUNING, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", "hydra/launcher=population"]
    proc = run_py([*args, "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "population(s)" in proc.stdout + proc.stderr
    storage = f"sqlite:///{workdir / 'sw' / 'optuna.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(storage)[0].study_name, storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    for t in study.trials:
        metrics = json.loads((workdir / "sw" / str(t.number) / "metrics.json").read_text())
        assert sorted(t.intermediate_values) == list(range(1, metrics["epochs_trained"] + 1))
        if t.state == TrialState.COMPLETE:
            assert metrics["status"] == "completed" and t.value == pytest.approx(metrics["objective_value"])


def test_a_population_whose_members_all_stop_early_ends_there(compose_cfg, tmp_path):
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, [["seed=1"], ["seed=2"]])
    calls = []

    def prune(entry):
        calls.append(entry["epoch"])
        raise Pruned(entry["epoch"], entry["val_acc"])

    for member in members:
        member.on_epoch = prune
    outcomes = train_population(members, ctx, teacher)
    assert all(isinstance(o, Pruned) and o.step == 1 for o in outcomes) and calls == [1, 1]


def test_the_seeds_of_one_job_stop_together_and_report_in_single_run_order(compose_cfg, tmp_path):
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, [["seed=1"], ["seed=2"], ["seed=3"]])
    reported = []

    def reporter(step, value):
        reported.append(step)
        if step == 3:  # the second seed's first epoch (2 epochs per seed)
            raise Pruned(step, value)

    for index, member in enumerate(members[:2]):  # one job of two seeds; the third member is another job
        member.job, member.on_epoch = "job", seed_reporter(reporter, index, 2)
    outcomes = train_population(members, ctx, teacher)
    # Seed 0 reports steps 1, 2 as it goes; seed 1's steps 3, 4 wait until seed 0 is done.
    assert reported == [1, 2, 3]
    assert isinstance(outcomes[0], Pruned) and outcomes[0] is outcomes[1] and outcomes[1].step == 3
    assert not isinstance(outcomes[2], BaseException)  # the other job finished


def test_a_populations_piped_log_shows_its_throughput_and_time_left(compose_cfg, tmp_path, caplog):
    cfgs, ctx, teacher, members = _members(compose_cfg, tmp_path, [["seed=1"], ["seed=2"]])
    caplog.set_level(logging.INFO, logger="kd")
    train_population(members, ctx, teacher, progress=False, log_every_s=0.0)  # a line at every check
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("population epoch")]
    steps = [m for m in lines if ": step " in m]
    assert steps and all(re.search(r", 2 members, [\d,]+ img/s, ETA (\d+s|\d+m\d\ds)$", m) for m in steps)
    epochs = [m for m in lines if re.search(r"population epoch \d+/\d+: 2 members", m)]
    assert len(epochs) == int(cfgs[0].trainer.epochs) and epochs[-1].endswith("population ETA 0s")
