"""Faults: bad inputs get one line, no process death loses a finished result, nothing
needs hand repair."""

import hashlib
import os
import pickle
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image

from kd.data import ImageFolderData
from kd.errors import CheckpointError, DataError, StorageError
from kd.models import DeepNN
from kd.storage import build_once, check_writable, save_checked
from kd.teacher import load_checkpoint, make_checkpoint
from tests.conftest import FAST, read_metrics, run_py

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _one_line_error(proc, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(("kd: error:", "kd_optuna: error:")), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def make_image_folder(root: Path, per_class: int = 6, classes: int = 2) -> Path:
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * c + i, 100, 200 - 30 * c)).save(folder / f"{i}.jpg")
    return root


# --- checkpoints and the store ---------------------------------------------------


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kd_pwned_by_checkpoint",))


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path):
    marker = Path("/tmp/kd_pwned_by_checkpoint")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": DeepNN().state_dict(), "payload": _RunsCodeOnLoad()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_messages_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    path = tmp_path / "t.pt"
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10), path)
    (tmp_path / "t.pt.sha256").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"t\.pt\.sha256 .* is damaged; delete it"):
        load_checkpoint(path)
    (tmp_path / "t.pt.sha256").unlink()
    assert "state_dict" in load_checkpoint(path)  # the checkpoint itself was fine


def test_a_store_entry_with_a_garbage_checksum_is_rebuilt(tmp_path):
    path = tmp_path / "entry.pt"
    build_once(path, lambda: {"v": torch.ones(2)})
    for garbage in ("not a checksum at all\n", "abc xyz\n", "\x00\xff\n"):
        (tmp_path / "entry.pt.sha256").write_bytes(garbage.encode("latin-1"))
        value, built = build_once(path, lambda: {"v": torch.zeros(2)})
        assert built and torch.equal(value["v"], torch.zeros(2))


@pytest.mark.slow
def test_a_store_that_cannot_be_written_stops_the_run_before_its_first_step(workdir):
    blocker = workdir / "not_a_dir"
    blocker.write_text("a file where the store should be")
    proc = run_py([*FAST, "hydra.run.dir=out"], cwd=workdir, env={"KD_STORE_DIR": str(blocker / "store")})
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"kd: error: {blocker / 'store'} cannot be written (Not a directory); "
        "point paths.store_dir (or KD_STORE_DIR, KD_CACHE_DIR) at a writable folder with free space"
    ]
    assert not (workdir / "out" / "metrics.json").exists()  # nothing trained, nothing half-written


def test_a_destination_is_probed_by_writing_into_it(tmp_path):
    check_writable(tmp_path / "new" / "folder", "paths.store_dir")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"file/sub cannot be written \(Not a directory\); point key at"):
        check_writable(tmp_path / "file" / "sub", "key")


# --- datasets --------------------------------------------------------------------


def test_a_truncated_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    bad = root / "train" / "class1" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"class1/3\.jpg is not a readable image.*data\.skip_bad_images=true"):
        ImageFolderData(str(root), val_size=2).load()
    data = ImageFolderData(str(root), val_size=2, skip_bad_images=True).load()
    assert len(data.train.labels) == 11 and len(data.test.labels) == 12


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_links_are_named(tmp_path, kind):
    root = make_image_folder(tmp_path / "imgs")
    link = root / "test" / "class0" / "link.jpg"
    if kind == "dangling":
        link.symlink_to(root / "nowhere.jpg")
    else:
        link.symlink_to(link)
    with pytest.raises(DataError, match=r"link\.jpg is a broken symbolic link"):
        ImageFolderData(str(root), val_size=2).load()
    assert len(ImageFolderData(str(root), val_size=2, skip_bad_images=True).load().test.labels) == 12


@pytest.mark.slow
def test_a_plain_multirun_with_a_bad_value_fails_like_a_single_run(workdir):
    single = run_py([*FAST, "trainer.epochs=0"], cwd=workdir)
    multi = run_py(["-m", *FAST, "trainer.epochs=1,0", "hydra.sweep.dir=sw"], cwd=workdir)
    assert single.returncode == multi.returncode == 2
    assert _one_line_error(multi) == _one_line_error(single, "trainer.epochs must be")


@pytest.mark.slow
def test_a_job_that_diverges_in_a_plain_multirun_is_one_line_and_the_others_finish(workdir):
    proc = run_py(["-m", *FAST, "trainer.check_every=1", "optim.lr=1e30,1e-3", "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "kd: job 0: training diverged" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kd: error: job(s) 0 diverged")
    assert read_metrics(workdir / "sw" / "0")["status"] == "diverged"
    assert read_metrics(workdir / "sw" / "1")["status"] == "completed"


def test_an_unwritable_run_directory_is_one_line_with_exit_code_4(workdir):
    (workdir / "afile").write_text("a file where a directory should be")
    proc = run_py([*FAST, "hydra.run.dir=afile/out"], cwd=workdir)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "kd: error: cannot write afile/out (Not a directory); choose a writable directory "
        "(hydra.run.dir, hydra.sweep.dir, paths.store_dir or KD_CACHE_DIR) with free space"
    ]
    debug = run_py([*FAST, "hydra.run.dir=afile/out"], cwd=workdir, env={"KD_DEBUG": "1"})
    assert debug.returncode == 4 and "Traceback" in debug.stderr  # KD_DEBUG=1 shows where


# --- the sweeper -----------------------------------------------------------------


def _sweep(*extra: str, study: str = "s") -> list[str]:
    return ["-m", "hparams_search=kd", *FAST, f"hydra.sweeper.study_name={study}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs"),
        (["hydra.sweeper.n_trials=-1"], "hydra.sweeper.n_trials"),
        (["hydra.sweeper.max_failure_rate=-1"], "hydra.sweeper.max_failure_rate"),
        (["trainer.epochs=0"], "trainer.epochs"),
    ],
)
def test_nonsense_sweeper_and_shared_config_values_are_refused_before_any_trial(workdir, extra, needle):
    proc = run_py([*_sweep(*extra), "hydra.sweep.dir=sw"], cwd=workdir, timeout=120)
    assert proc.returncode == 2
    _one_line_error(proc, needle)
    assert not any((workdir / "sw").glob("[0-9]*"))


@pytest.mark.slow
def test_n_jobs_minus_one_means_every_core(workdir):
    proc = run_py([*_sweep("hydra.sweeper.n_jobs=-1", "hydra.sweeper.n_trials=2"), "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all((workdir / "sw" / str(n) / "metrics.json").exists() for n in (0, 1))


@pytest.mark.slow
def test_a_diverging_trial_under_joblib_never_ends_the_sweep(workdir):
    args = _sweep(
        "optim.lr=choice(0.001,1e30)",
        "trainer.check_every=1",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.75",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        study="jl",
    )
    proc = run_py([*args, "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name="jl", storage=f"sqlite:///{workdir}/sw/optuna.db")
    states = {t.number: t.state for t in study.trials}
    assert TrialState.RUNNING not in states.values() and len(states) == 4
    for t in study.trials:
        assert (t.state == TrialState.FAIL) == (t.params["optim.lr"] == 1e30)
        if t.state == TrialState.FAIL:
            assert "training diverged" in (workdir / "sw" / str(t.number) / "run.log").read_text()
    assert {TrialState.FAIL, TrialState.COMPLETE} <= set(states.values())


@pytest.mark.slow
def test_a_stopped_sweep_resumes_once_the_cause_is_fixed(workdir):
    root = workdir / "imgs"  # missing at first: every trial fails
    args = [
        "-m",
        "hparams_search=kd",
        "data=folder",
        f"data.root={root}",
        "data.val_size=4",
        *[a for a in FAST if not a.startswith("data")],
        "hydra.sweeper.study_name=fixme",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.33",  # ceil(0.33 x 3) = 1 failure allowed: the second stops it
    ]
    first = run_py(args, cwd=workdir)
    assert first.returncode != 0 and "fix the cause, then rerun the same command" in first.stderr + first.stdout
    make_image_folder(root)
    again = run_py(args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    study = optuna.load_study(study_name="fixme", storage=f"sqlite:///{workdir}/multirun/fixme/optuna.db")
    # The two failures stay on record (they count towards n_trials); the rerun was not
    # stopped by them and finished the study.
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_trial_parameters_depend_on_seed_and_number_not_on_batching(workdir):
    drawn = []
    for jobs in (1, 2):
        args = _sweep("hydra.sweeper.n_trials=4", f"hydra.sweeper.n_jobs={jobs}", study=f"b{jobs}")
        proc = run_py(args, cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-2000:]
        study = optuna.load_study(study_name=f"b{jobs}", storage=f"sqlite:///{workdir}/multirun/b{jobs}/optuna.db")
        drawn.append([t.params for t in study.trials])
    assert drawn[0] == drawn[1]  # start-up trials: the same draws whatever the batch size


@pytest.mark.slow
def test_a_null_sampler_seed_is_drawn_once_and_recorded(workdir):
    args = _sweep("hydra.sweeper.sampler.seed=null", "hydra.sweeper.n_trials=1", study="rnd")
    assert run_py(args, cwd=workdir).returncode == 0
    storage = f"sqlite:///{workdir}/multirun/rnd/optuna.db"
    seed = optuna.load_study(study_name="rnd", storage=storage).user_attrs["kd:base_seed"]
    args[-2] = "hydra.sweeper.n_trials=2"
    assert run_py(args, cwd=workdir).returncode == 0
    assert optuna.load_study(study_name="rnd", storage=storage).user_attrs["kd:base_seed"] == seed


@pytest.mark.slow
def test_opening_a_study_with_the_opposite_direction_is_refused(workdir):
    storage = f"sqlite:///{workdir}/dir.db"
    optuna.create_study(study_name="d", storage=storage, direction="maximize")
    proc = run_py(
        [*_sweep(f"hydra.sweeper.storage={storage}", "hydra.sweeper.direction=minimize", study="d")], cwd=workdir
    )
    assert proc.returncode == 2
    _one_line_error(proc, "created to maximize", "would minimize")


def test_job_errors_pickle_with_their_fields():
    from kd.errors import Diverged

    again = pickle.loads(pickle.dumps(Diverged(1, 2, 3.0, "x")))
    assert (again.epoch, again.step, again.value, again.phase) == (1, 2, 3.0, "x")


def test_a_store_entry_whose_forged_checksum_matches_unloadable_bytes_is_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "entry.pt"
    build_once(path, lambda: {"v": torch.ones(2)})
    garbage = b"not a torch file at all"
    path.write_bytes(garbage)
    (tmp_path / "entry.pt.sha256").write_text(f"{hashlib.sha256(garbage).hexdigest()} {len(garbage)}\n")
    value, built = build_once(path, lambda: {"v": torch.zeros(2)})  # never blocks
    assert built and torch.equal(value["v"], torch.zeros(2))
    aside = list(tmp_path.glob("entry.pt.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage  # kept for inspection
    assert torch.equal(build_once(path, lambda: None)[0]["v"], torch.zeros(2))  # the rebuilt entry is found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["hydra/launcher=population", "hydra.launcher.max_members=0"],
            "kd: error: hydra.launcher: hydra.launcher.max_members must be >= 1, got 0",
        ),
        (
            ["hparams_search=kd", "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_warmup_steps=-3"],
            "kd: error: hydra.sweeper.pruner: Number of warmup steps cannot be negative, but got n_warmup_steps=-3.",
        ),
    ],
    ids=["max_members", "pruner"],
)
def test_a_plugin_that_refuses_its_keys_is_one_line_with_exit_code_2(workdir, args, line):
    proc = run_py(["-m", *FAST, *args, "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line] and not (workdir / "sw").exists()
