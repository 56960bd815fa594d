"""Distillation methods as plug-ins: the protocol, each method against a hand
computation, cached teacher features, and one run per method."""

import math

import pytest
import torch

from kd.losses import DKD, CosineHidden, FeatureRegressor, LossInputs, Progress, StandardisedKD
from kd.models import DeepNN, LightNN
from kd.plan import resolve
from kd.provision import prepare_teacher
from kd.recipes import make_context
from kd.storage import save_checked
from kd.teacher import TeacherStore, load_checkpoint, make_checkpoint
from tests.conftest import FAST, REPO, read_metrics, run_py

STUDENT = [[1.0, -0.5, 0.25], [0.3, 2.0, -1.0]]
TEACHER = [[2.0, 0.0, -1.0], [-0.5, 1.5, 0.5]]
LABELS = [0, 2]


def _softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def _ce(row, y):
    return -math.log(_softmax(row)[y])


def _inputs(**kw):
    return LossInputs(torch.tensor(STUDENT), torch.tensor(LABELS), torch.tensor(TEACHER), **kw)


def test_dkd_matches_hand_computation():
    t, a, b = 2.0, 1.0, 8.0
    tckd = nckd = ce = 0.0
    for s, te, y in zip(STUDENT, TEACHER, LABELS, strict=True):
        ps, pt = _softmax(s, t), _softmax(te, t)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [i for i in range(3) if i != y]
        nckd += _kl(_softmax([te[i] for i in rest], t), _softmax([s[i] for i in rest], t))
        ce += _ce(s, y)
    n = len(LABELS)
    expected = ce / n + a * t**2 * tckd / n + b * t**2 * nckd / n
    out = DKD(a, b, t, warmup_epochs=0)(_inputs())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["tckd"].item() == pytest.approx(t**2 * tckd / n, rel=1e-5)


def test_dkd_warms_up_linearly_with_training_progress():
    full = DKD(warmup_epochs=0)(_inputs())
    half = DKD(warmup_epochs=2)(_inputs(progress=Progress(epoch=1, epochs=10, step=10, steps_per_epoch=10)))
    kd_part = full["loss"] - full["ce"]
    assert (half["loss"] - half["ce"]).item() == pytest.approx(0.5 * kd_part.item(), rel=1e-5)


def test_standardised_kd_matches_hand_computation():
    t, alpha = 2.0, 0.25

    def z(row):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / (std + 1e-7) for v in row]

    kl = sum(_kl(_softmax(z(te), t), _softmax(z(s), t)) for s, te in zip(STUDENT, TEACHER, strict=True)) / 2
    ce = sum(_ce(s, y) for s, y in zip(STUDENT, LABELS, strict=True)) / 2
    out = StandardisedKD(t, alpha)(_inputs())
    assert out["loss"].item() == pytest.approx(alpha * t**2 * kl + (1 - alpha) * ce, rel=1e-5)


def test_cosine_pools_the_teacher_to_the_students_width_and_matches_by_hand():
    student = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]])  # 2 x (1x1x2): width 2
    teacher = torch.tensor([[[[1.0, 3.0, 2.0, 2.0]]], [[[1.0, 1.0, -2.0, 0.0]]]])  # width 4 -> pooled pairs
    pooled = [[2.0, 2.0], [1.0, -1.0]]
    flat = [[1.0, 2.0], [0.5, -1.0]]
    cos = [
        sum(a * b for a, b in zip(u, v, strict=True)) / math.hypot(*u) / math.hypot(*v)
        for u, v in zip(flat, pooled, strict=True)
    ]
    expected_cos = sum(1 - c for c in cos) / 2
    ce = sum(_ce(s, y) for s, y in zip(STUDENT, LABELS, strict=True)) / 2
    out = CosineHidden(weight=0.3)(_inputs(student_features={"conv": student}, teacher_features={"conv": teacher}))
    assert out["cosine"].item() == pytest.approx(expected_cos, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.3 * expected_cos + 0.7 * ce, rel=1e-5)


def test_regressor_maps_student_channels_and_is_trainable():
    loss = FeatureRegressor(weight=0.5, student_channels=2, teacher_channels=3)
    with torch.no_grad():
        loss.regressor.weight.zero_()
        loss.regressor.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))  # maps anything to these constants
    student = torch.randn(2, 2, 4, 4, requires_grad=True)
    teacher = torch.zeros(2, 3, 4, 4)
    out = loss(_inputs(student_features={"conv": student}, teacher_features={"conv": teacher}))
    assert out["mse"].item() == pytest.approx((1 + 4 + 9) / 3)
    out["loss"].backward()
    assert loss.regressor.bias.grad is not None and loss.regressor.bias.grad.abs().sum() > 0


SMALL = ["data=synthetic", "data.train_size=96", "data.test_size=32", "data.val_size=16", "trainer.device=cpu"]


@pytest.mark.parametrize("method", ["cosine", "regressor"])
def test_cached_teacher_features_give_the_online_teachers_loss(compose_cfg, tmp_path, method):
    torch.manual_seed(1)
    path = tmp_path / "teacher.pt"
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10), path)
    cfg = compose_cfg(f"loss={method}", *SMALL, f"teacher.checkpoint={path}", f"paths.store_dir={tmp_path}/s")
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    source = prepare_teacher(ctx, TeacherStore(cfg.paths.store_dir), ("conv",))
    assert source.info["teacher_signal"] == "cache"
    teacher = DeepNN().to(memory_format=torch.channels_last).eval()
    teacher.load_state_dict(load_checkpoint(path)["state_dict"])
    student = LightNN()
    loss_fn = CosineHidden() if method == "cosine" else FeatureRegressor()
    from kd.batches import BatchStream

    for idx, images, labels in BatchStream(ctx.train_images, ctx.train_labels, ctx.data.train_idx, 32, seed=3).epoch(1):
        x = ctx.preprocess(images)
        with torch.no_grad():
            logits, features = student.forward_with_features(x)
            t_logits, t_features = teacher.forward_with_features(x)
            online = loss_fn(LossInputs(logits, labels, t_logits, features, t_features))["loss"]
            c_logits, c_features = source.signal(idx, x, None)
            from_cache = loss_fn(LossInputs(logits, labels, c_logits, features, c_features))["loss"]
        torch.testing.assert_close(from_cache, online, rtol=2e-3, atol=2e-3)  # features cached in float16


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cosine", "regressor", "dkd", "kd_std"])
def test_every_method_runs_end_to_end(workdir, method):
    proc = run_py([*FAST, f"loss={method}", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(workdir / "out")
    assert m["loss"] == method and m["status"] == "completed" and m["loss_hparams"]
    assert m["params"] == 267_738  # a regressor learns with the student but is not part of it
    terms = {k for k in m["history"][0] if k.startswith("loss_")}
    assert "loss_ce" in terms and len(terms) >= 2
    state = load_checkpoint(workdir / "out" / "model.pt")["state_dict"]
    assert not any(k.startswith("regressor") for k in state)
    assert m["kd_minus_ce"]["val_acc"]["n"] == 1


def _docs_example() -> tuple[str, str, str]:
    """The worked example of docs/methods.md: its Python module, its loss YAML and its
    search space, the three files a new method is."""
    text = (REPO / "docs" / "methods.md").read_text()
    python = text.split("```python\n", 1)[1].split("```", 1)[0]
    loss, space = (block.split("```", 1)[0] for block in text.split("```yaml\n")[1:3])
    return python, loss, space


@pytest.mark.slow
def test_the_documented_new_method_trains_alone_in_a_population_and_in_a_sweep(workdir):
    python, loss, space = _docs_example()
    assert "conf/loss/topclass.yaml" in loss and "conf/hparams_search/topclass.yaml" in space
    (workdir / "mymethods.py").write_text(python)
    for group, text in (("loss", loss), ("hparams_search", space)):
        (workdir / "myconf" / group).mkdir(parents=True)
        (workdir / "myconf" / group / "topclass.yaml").write_text(text)
    args = [*FAST, "loss=topclass", f"hydra.searchpath=[file://{workdir}/myconf]", "extra_targets=[mymethods.*]"]
    env = {"PYTHONPATH": f"{REPO}:{workdir}"}
    proc = run_py([*args, "hydra.run.dir=out"], cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_metrics(workdir / "out")
    assert m["loss"] == "topclass" and m["loss_hparams"] == {"temperature": 2.0, "weight": 0.5}
    assert {"loss_ce", "loss_kl"} <= set(m["history"][0]) and m["teacher_source"] == "trained"
    from kd.run_table import label

    assert label(m) == "Student + top-class KD (T=2, w=0.5)"
    assert m["loss_symbols"] == [["temperature", "T"], ["weight", "w"]]  # in the method's order
    sweep = ["-m", *args, "loss.temperature=1,4", "hydra/launcher=population", "hydra.sweep.dir=pop"]
    proc = run_py(sweep, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "in 1 population(s) of sizes [2]" in proc.stdout + proc.stderr
    temperatures = [read_metrics(workdir / "pop" / job)["loss_hparams"]["temperature"] for job in ("0", "1")]
    assert temperatures == [1.0, 4.0]
    search = ["-m", *args, "hparams_search=topclass", "hydra.sweeper.n_trials=2", "hydra.sweep.dir=sw"]
    proc = run_py(search, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    swept = [read_metrics(workdir / "sw" / job)["loss_hparams"] for job in ("0", "1")]
    assert all(1.0 <= h["temperature"] <= 8.0 and 0.0 <= h["weight"] <= 1.0 for h in swept), swept
    assert swept[0] != swept[1] and swept[0] != {"temperature": 2.0, "weight": 0.5}
