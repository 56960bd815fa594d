"""The first hour of a user: summaries, help, hints, quiet logs, no litter, shared files."""

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch

from kd.batches import BatchStream, Preprocess
from kd.engine import fit
from kd.hints import SWEEP_FORMS, sweep_syntax_error
from kd.losses import CrossEntropy
from kd.models import LightNN
from kd.report import report
from tests.conftest import FAST, REPO, RUN_PY, run_py

ESCAPES = re.compile(r"\x1b\[|\r")


def test_help_lists_every_group_and_examples(tmp_path):
    proc = run_py(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for group in ["model", "loss", "data", "optim", "trainer", "paths", "logger", "experiment", "hparams_search"]:
        assert re.search(rf"^{group}\b", proc.stdout, re.M), group
    assert "python run.py experiment=seed_kd" in proc.stdout and "hydra/launcher" in proc.stdout
    for group in ["model", "loss", "data", "optim", "schedule", "experiment", "hparams_search"]:  # read from conf/
        listed = re.search(rf"^{group}: (.*)$", proc.stdout, re.M)
        assert listed and set(listed[1].split(", ")) == {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["loss.alpha=1.5"], "loss.alpha is a key of loss=kd"),
        (["loss=kd", "loss.temprature=4"], "did you mean loss.temperature?"),
        (["model=resnet9"], "model has no option 'resnet9': did you mean resnet8 or resnet20"),
        (["loss=kdd"], "did you mean kd or dkd"),
    ],
)
def test_a_refused_key_gets_a_hint_naming_where_it_lives(tmp_path, args, hint):
    proc = run_py([*args, "data=synthetic"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # kd's one line first, then the hint (Hydra's own "+key" advice is not shown).
    assert lines[0].startswith(("kd: error: Could not override", "kd: error: In 'config': Could not find"))
    assert "To append" not in proc.stderr
    assert lines[1].startswith("kd: hint: ") and hint in lines[1]


@pytest.mark.parametrize(
    ("override", "wrong"),
    [
        ("loss.alpha=intervl(0,1)", "intervl(...) is no sweep function (did you mean interval?)"),
        ("loss.alpha=interval(0,1", "its ( and ) do not pair up"),
    ],
)
def test_a_sweep_syntax_error_is_one_line_naming_the_token_and_the_forms(tmp_path, override, wrong):
    proc = run_py(["-m", "loss=kd", override, "data=synthetic"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"kd: error: cannot read the override {override}: {wrong}; accepted forms: {SWEEP_FORMS}"
    ]


def test_a_parse_error_is_explained_by_what_is_wrong_in_it():
    def said(override: str) -> str | None:
        return sweep_syntax_error(f"Error when parsing index: 0, string: {override} out of ['{override}']")

    assert "did you mean choice?" in said("x=chioce(1,2)") and "no sweep function" in said("x=foo(1)")
    assert "did you mean" not in said("x=zzzzzz(1)")
    assert "tag(...)" not in said("x=tag(log,intervl(1,2))") and "intervl(...)" in said("x=tag(log,intervl(1,2))")
    assert "[ and ] do not pair up" in said("x=[1,2") and "{ and } do not pair up" in said("x={a:1")
    assert "quote is not closed" in said("x='a") and "quote is not closed" in said('x="a')
    assert said("x=1 2").endswith("it is not a value Hydra can read; accepted forms: " + SWEEP_FORMS)
    assert said("x=1 2").startswith("cannot read the override x=1 2: ")
    assert sweep_syntax_error("Could not override 'loss.alpha'") is None  # another error: not ours


@pytest.mark.slow
def test_a_run_ends_naming_its_results_and_a_redirected_log_is_plain(workdir):
    proc = run_py([*FAST[:-2], "loss=kd", "trainer.device=cpu", "hydra.run.dir=out"], cwd=workdir)  # progress: auto
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    path = last.split("results: ", 1)[1]
    assert os.path.isfile(path) and path.endswith("out/metrics.json")
    assert re.search(r"teacher: .* \(trained; val_acc [\d.]+%, test_acc [\d.]+%\)", proc.stdout)
    phases = "phases: teacher (1 epoch) -> teacher logits over the training set -> LightNN (1 epoch) -> CE baseline"
    assert phases in proc.stdout and re.search(r"teacher logits: 256 images in \d+s \([\d,]+ img/s\)", proc.stdout)
    for text in (proc.stdout, proc.stderr, (workdir / "out" / "run.log").read_text()):
        assert not ESCAPES.search(text)


@pytest.mark.slow
def test_a_sweep_log_is_plain_and_ends_with_the_report_command(workdir):
    args = ["-m", "hparams_search=kd", *FAST[:-2], "trainer.device=cpu", "hydra.sweeper.n_trials=2"]
    proc = run_py([*args, "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not ESCAPES.search(proc.stdout + proc.stderr)
    assert proc.stdout.strip().splitlines()[-1].endswith("next: python -m kd.report sw")


def test_without_a_bar_a_long_epoch_still_logs(caplog):
    images = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    batches = BatchStream(images, labels, torch.arange(64), batch_size=8, seed=0)
    model = LightNN()
    with caplog.at_level(logging.INFO, logger="kd.engine"):
        fit(
            model,
            CrossEntropy(),
            torch.optim.Adam(model.parameters()),
            batches,
            Preprocess((0.5,) * 3, (0.25,) * 3, torch.device("cpu")),
            2,
            progress=False,
            check_every=2,
            log_every_s=0.0,
        )
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if ": step " in line]
    assert len(steps) == 8 and steps[0].startswith("train epoch 1/2: step 2/8, loss")
    assert all(re.search(r", [\d,]+ img/s, ETA (\d+s|\d+m\d\ds)$", line) for line in steps), steps
    assert steps[-1].endswith("ETA 0s")  # the phase's last step: nothing left
    ends = [line for line in lines if re.match(r"train epoch \d/2: loss", line)]
    assert re.search(r"; train ETA \d+s$", ends[0]) and "ETA" not in ends[1]  # none after the last epoch


def test_a_refused_run_leaves_no_folder(tmp_path):
    proc = run_py(["data=synthetic", "trainer.epochs=0"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("kd: error: trainer.epochs")
    assert list(tmp_path.iterdir()) == []


def test_files_are_written_with_the_users_umask(tmp_path):
    code = (
        "import os, sys; os.umask(int(sys.argv[1], 8)); from kd.storage import write_json;"
        "write_json('x.json', {}); print(oct(os.stat('x.json').st_mode & 0o777))"
    )
    for umask, mode in [("022", "0o644"), ("027", "0o640"), ("002", "0o664")]:
        out = subprocess.run(
            [sys.executable, "-c", code, umask], cwd=tmp_path, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert out.stdout.strip() == mode, out.stderr


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_saying_how_to_resume(workdir):
    args = [*FAST, "data.train_size=4096", "trainer.epochs=200", "hydra.run.dir=out"]
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        # As from a terminal: a suite started in the background (`nohup ... &`) hands its
        # children an ignored SIGINT, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    for line in proc.stdout:
        if "epoch 1/200" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["kd: interrupted; rerun the same command to resume (finished work is kept)"]


def test_a_degenerate_sweep_gets_a_note_not_an_empty_chart(tmp_path):
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    study.optimize(lambda t: t.suggest_float("loss.alpha", 0, 1) * 0 + 50.0, n_trials=2)
    summary = report([tmp_path], tmp_path / "out")
    assert "param_importances.png" not in summary["plots"]
    assert any("No parameter-importance plot" in n for n in summary["notes"])
    assert "No parameter-importance plot" in (tmp_path / "out" / "report.md").read_text()


def test_a_missing_mandatory_value_is_one_line_naming_the_key(tmp_path):
    proc = run_py(["data=folder"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "kd: error: data.root needs a value (its YAML says ???): add data.root=... to the command"
    ]


@pytest.mark.parametrize(
    ("stopping", "hinted"),
    [(None, True), (SystemExit(130), False), (KeyboardInterrupt(), False), (SystemExit(1), True)],
    ids=["finished", "interrupted", "ctrl-c", "failed"],
)
def test_an_interrupted_sweep_ends_on_how_to_resume_not_on_the_report_command(tmp_path, caplog, stopping, hinted):
    from omegaconf import OmegaConf

    from kd.tuning import ReportHint

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    caplog.set_level(logging.INFO, logger="kd.tuning")

    def multirun() -> None:  # as Hydra calls it: from a finally block, on the way out of the sweep
        try:
            if stopping is not None:
                raise stopping
        finally:
            ReportHint().on_multirun_end(config)

    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        multirun()
    assert ("next: python -m kd.report" in caplog.text) == hinted
