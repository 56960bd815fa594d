import itertools
from pathlib import Path

import pytest

from kd.config import build, degenerate_settings, validate
from kd.errors import ConfigError
from kd.recipes import check_phases

MODELS, LOSSES, DATA = ["teacher", "student"], ["ce", "kd"], ["cifar10", "folder", "synthetic"]


@pytest.mark.parametrize(("model", "loss", "data"), list(itertools.product(MODELS, LOSSES, DATA)))
def test_every_group_combination_composes(compose_cfg, model, loss, data):
    root = ["data.root=/some/where"] if data != "synthetic" else []
    cfg = compose_cfg(f"model={model}", f"loss={loss}", f"data={data}", *root)
    validate(cfg)
    assert cfg.model._target_.endswith("DeepNN" if model == "teacher" else "LightNN")
    assert cfg.teacher.model._target_ == "kd.models.DeepNN"
    loss_fn = build(cfg.loss)
    assert loss_fn.needs_teacher == (loss == "kd")
    if loss == "kd":
        assert (loss_fn.temperature, loss_fn.alpha) == (2.0, 0.25)


@pytest.mark.parametrize("experiment", ["seed_teacher", "seed_student", "seed_kd"])
def test_seed_experiments_carry_the_seed_settings(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    assert (cfg.seed, cfg.optim.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (42, 1e-3, 128, 10)
    assert cfg.data.val_size == 0 and cfg.data.augment is False
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406] and list(cfg.data.std) == [0.229, 0.224, 0.225]
    expected = {
        "seed_teacher": ("DeepNN", "CrossEntropy"),
        "seed_student": ("LightNN", "CrossEntropy"),
        "seed_kd": ("LightNN", "HintonKD"),
    }[experiment]
    assert (cfg.model._target_.rsplit(".", 1)[1], cfg.loss._target_.rsplit(".", 1)[1]) == expected


def test_optuna_search_composes(compose_cfg):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=["hparams_search=kd"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("KDOptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == 42
    assert sweeper.params["loss.temperature"] == "tag(log, interval(1.0, 20.0))"
    assert sweeper.params["loss.alpha"] == "interval(0.0, 1.0)"
    assert cfg.loss._target_ == "kd.losses.HintonKD"


@pytest.mark.parametrize("launcher", ["joblib", "slurm", "slurm_cpu"])
def test_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    if launcher == "joblib":
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    else:
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        for key in ("partition", "gpus_per_node", "timeout_min", "mem_gb"):
            assert key in cfg.hydra.launcher


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-2", "loss.temperature"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("loss.alpha=-0.1", "loss.alpha"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("data.val_size=-1", "data.val_size"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.device=cpu:abc", "trainer.device"),
        ("trainer.device=cuda:", "trainer.device"),
        ("trainer.device=auto:0", "trainer.device"),
        ("trainer.epochs=two", "trainer.epochs"),
        ("trainer.check_every=0", "trainer.check_every"),
        ("data.num_classes=1", "data.num_classes"),
        ("data.std=[0.2,0,0.2]", "data.std"),
        ("data.std=[0.2,0.2]", "data.std"),
        ("data.mean=[a,b,c]", "data.mean"),
        ("seed=-1", "seed"),
        ("seed=99999999999", "seed"),
        ("teacher.seed=-3", "teacher.seed"),
        ("trial.seeds=[1,1]", "trial.seeds"),
        ("trial.seeds=[-1]", "trial.seeds"),
        ("teacher.checkpoint=5", "teacher.checkpoint"),
        ("trial.baseline=maybe", "trial.baseline"),
        ("objective=train_acc", "objective"),
        ("objective=[val_acc,val_acc]", "objective"),
        ("objective=[val_acc,energy]", "objective"),
        ("objective=[]", "objective"),
        ("trainer.resume=sometimes", "trainer.resume"),
        ("trainer.checkpoint_every_s=0", "trainer.checkpoint_every_s"),
    ],
)
def test_out_of_range_values_are_refused_by_name(compose_cfg, override, key):
    cfg = compose_cfg("loss=kd", "data=synthetic", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim=sgd", "optim.momentum=-1"], r"optim.momentum must be in [0, 1), got -1"),
        (["optim=sgd", "+optim.dampening=2"], r"optim.dampening must be in [0, 1]"),
        (["+optim.betas=[0.9,1.5]"], r"optim.betas must be two numbers in [0, 1)"),
        (["+optim.eps=0"], "optim.eps must be > 0"),
        (["schedule=onecycle", "schedule.div_factor=0"], "schedule.div_factor must be > 0"),
        (["schedule=onecycle", "schedule.final_div_factor=-1"], "schedule.final_div_factor must be > 0"),
        (["loss=dkd", "loss.temperature=1e300"], r"loss.temperature must be in (0, 1000], got 1e+300"),
        (["+teacher.optim.betas=[1,0.9]"], "teacher.optim.betas must be two numbers"),
    ],
)
def test_optimiser_and_schedule_ranges_are_refused_in_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("data=synthetic", *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_degenerate_but_legal_settings_are_named_and_sensible_ones_are_not(compose_cfg):
    assert degenerate_settings(compose_cfg("loss=kd")) == []
    found = degenerate_settings(compose_cfg("loss=kd", "loss.temperature=1e-30", "optim.lr=5"))
    assert [line.split(":")[0] for line in found] == ["loss.temperature=1e-30", "optim.lr=5"]
    assert "one-hot" in found[0] and "diverges" in found[1]
    assert degenerate_settings(compose_cfg("loss=kd", "loss.temperature=500"))[0].startswith("loss.temperature=500")
    validate(compose_cfg("loss=kd", "data=synthetic", "loss.temperature=1e-30"))  # warned about, not refused


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["loss=kd", "loss.alpha=0"], "loss.alpha=0: plain cross-entropy"),
        (["loss=kd_std", "loss.alpha=0"], "loss.alpha=0: plain cross-entropy"),
        (["loss=cosine", "loss.weight=0"], "loss.weight=0: plain cross-entropy"),
        (["data=synthetic", "trainer.batch_size=448"], "one step per epoch"),
        (["loss=kd", "data.augment=true", "teacher.views=1"], "one augmented view per image"),
    ],
)
def test_degenerate_combinations_are_named(compose_cfg, overrides, words):
    found = degenerate_settings(compose_cfg(*overrides))
    assert len(found) == 1 and words in found[0], found


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=ce"],
        ["loss=kd", "loss.alpha=0.01"],
        ["loss=cosine", "loss.weight=0.01"],
        ["data=synthetic", "trainer.batch_size=447"],
        ["loss=kd", "data.augment=true", "teacher.views=2"],
        ["loss=ce", "data.augment=true", "teacher.views=1"],
    ],
)
def test_sensible_neighbours_of_degenerate_combinations_are_not_named(compose_cfg, overrides):
    assert degenerate_settings(compose_cfg(*overrides)) == []


def test_a_one_cycle_schedule_with_a_zero_step_warm_up_is_refused(compose_cfg):
    schedule = compose_cfg("schedule=onecycle").schedule
    with pytest.raises(ConfigError, match="schedule=onecycle over 4 optimiser steps with pct_start=0.25"):
        check_phases(schedule, 4)
    for steps in (1, 2, 3, 5, 100):
        check_phases(schedule, steps)  # torch steps these without dividing by zero


def test_the_cache_is_absolute_and_follows_kd_cache_dir_then_xdg(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_CACHE_DIR", "relative/cache")
    assert compose_cfg().paths.cache_dir == str(tmp_path / "relative" / "cache")  # made absolute
    monkeypatch.delenv("KD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = compose_cfg()
    assert cfg.paths.cache_dir == str(tmp_path / "xdg" / "kd") and cfg.paths.store_dir == str(tmp_path / "xdg/kd/store")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compose_cfg().paths.cache_dir == str(tmp_path / "home" / ".cache" / "kd")
    monkeypatch.setenv("KD_STORE_DIR", str(tmp_path / "elsewhere"))
    assert compose_cfg().paths.store_dir == str(tmp_path / "elsewhere")


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import sys

    from kd.tracking import MLflowLogger, TensorBoardLogger

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"logger=mlflow needs mlflow: pip install 'kd\[mlflow\]'"):
        MLflowLogger(tmp_path)
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs .*: pip install 'kd\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)


def test_old_search_space_names_compose_the_renamed_presets_with_a_note(caplog):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kd.tuning import RENAMED_PRESETS, note_deprecated_preset

    def space(option: str) -> dict:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
            cfg = compose(config_name="config", overrides=[f"hparams_search={option}"], return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.sweeper.params)

    for old, new in RENAMED_PRESETS.items():
        assert space(old) == space(new) and space(new)
        assert (
            note_deprecated_preset(old)
            == f"hparams_search={old} is now hparams_search={new} (the old name still works)"
        )
        assert note_deprecated_preset(new) is None
    assert "hparams_search=kd_optuna is now hparams_search=kd" in caplog.text
