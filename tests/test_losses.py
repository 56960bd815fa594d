import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import (
    DKD,
    CosineHidden,
    CrossEntropy,
    FeatureRegressor,
    HintonKD,
    LossInputs,
    Progress,
    StandardisedKD,
    blend,
    distillation_divergence,
    for_members,
)


def total(loss, student, labels, teacher=None):
    return loss(LossInputs(student, labels, teacher))["loss"]


def _softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_kd(student, teacher, labels, temperature, alpha):
    """The Hinton loss written out with plain floats."""
    kl_sum, ce_sum = 0.0, 0.0
    for s, t, y in zip(student, teacher, labels, strict=True):
        p_t, p_s = _softmax(t, temperature), _softmax(s, temperature)
        kl_sum += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
        ce_sum += -math.log(_softmax(s, 1.0)[y])
    n = len(labels)
    return alpha * temperature**2 * kl_sum / n + (1 - alpha) * ce_sum / n


STUDENT = [[1.0, -0.5, 0.25], [0.3, 2.0, -1.0]]
TEACHER = [[2.0, 0.0, -1.0], [-0.5, 1.5, 0.5]]
LABELS = [0, 2]


@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.25), (4.0, 0.5), (1.0, 1.0), (7.5, 0.9)])
def test_kd_matches_hand_computation(temperature, alpha):
    loss = total(HintonKD(temperature, alpha), torch.tensor(STUDENT), torch.tensor(LABELS), torch.tensor(TEACHER))
    assert loss.item() == pytest.approx(_hand_kd(STUDENT, TEACHER, LABELS, temperature, alpha), rel=1e-5)


def test_stored_value_guards_the_maths():
    # Computed once by _hand_kd; a refactor that changes the loss must change this test.
    loss = total(HintonKD(2.0, 0.25), torch.tensor(STUDENT), torch.tensor(LABELS), torch.tensor(TEACHER))
    assert loss.item() == pytest.approx(1.4964149, rel=1e-6)


def test_temperature_squared_scaling():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean")
    assert distillation_divergence(s, t, 3.0).item() == pytest.approx(9 * kl.item(), rel=1e-6)


def test_kl_is_batch_mean_not_class_mean():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    per_example_sum = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="sum").item() / len(s)
    assert distillation_divergence(s, t, 1.0).item() == pytest.approx(per_example_sum, rel=1e-6)


def test_alpha_zero_equals_cross_entropy():
    s, y, t = torch.randn(8, 10), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    assert total(HintonKD(4.0, 0.0), s, y, t).item() == pytest.approx(total(CrossEntropy(), s, y).item(), rel=1e-6)


def test_gradient_reaches_only_the_student():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    total(HintonKD(2.0, 0.5), s, torch.tensor([0, 1, 2, 3]), t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_needs_teacher_logits():
    with pytest.raises(ValueError):
        total(HintonKD(), torch.randn(2, 3), torch.tensor([0, 1]))


# --- DKD and the cosine loss against their published formulas, and at the edges ------


def _reference_dkd(student, teacher, labels, temperature):
    """TCKD and NCKD as the method's published code computes them (megvii-research/
    mdistiller, mdistiller/distillers/DKD.py, ``dkd_loss``): softmax, masked sums into
    (target, others), log; NCKD with the target logit pushed down by 1000. Rewritten
    here, to be run in float64 as the oracle."""
    gt = F.one_hot(labels, student.shape[1]).bool()
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * temperature**2 / len(labels)
    p2_t = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_p2_s = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = (p2_t * (p2_t.clamp_min(1e-300).log() - log_p2_s)).sum() * temperature**2 / len(labels)
    return tckd, nckd


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_dkd_terms_match_the_published_formula_in_value_and_gradient(temperature):
    from kd.losses.methods import dkd_terms

    gen = torch.Generator().manual_seed(int(temperature))
    student = (3 * torch.randn(8, 10, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(8, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (8,), generator=gen)
    ours = dkd_terms(student, teacher, labels, temperature)
    reference = _reference_dkd(student, teacher, labels, temperature)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)
        (g_mine,) = torch.autograd.grad(mine, student, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(theirs, student, retain_graph=True)
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-7, atol=1e-12)


def test_tckd_keeps_its_gradient_past_a_logit_gap_of_27_6_t():
    from kd.losses.methods import dkd_terms

    # The student is 40 logits sure of class 0 at T=1; the teacher is not (uniform).
    student = torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.zeros(1, 3, dtype=torch.float64)
    tckd, _ = dkd_terms(student, teacher, torch.tensor([0]), 1.0)
    (grad,) = torch.autograd.grad(tckd, student)
    ref_tckd, _ = _reference_dkd(student, teacher, torch.tensor([0]), 1.0)
    (ref_grad,) = torch.autograd.grad(ref_tckd, student)
    assert grad[0, 0].item() == pytest.approx(ref_grad[0, 0].item(), rel=1e-9)
    assert abs(grad[0, 0].item()) > 0.1  # the clamped version gave exactly 0 here
    assert tckd.item() == pytest.approx(ref_tckd.item(), rel=1e-9)


def test_cosine_distance_matches_the_formula_and_ignores_dead_rows():
    from kd.losses.methods import cosine_distance

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    student[2] = 0.0  # a dead feature map
    student.requires_grad_()
    distance = cosine_distance(student, teacher)
    expected = 1 - (student * teacher).sum(1) / (student.norm(dim=1) * teacher.norm(dim=1))
    torch.testing.assert_close(distance[[0, 1, 3]], expected[[0, 1, 3]])
    assert distance[2].item() == 1.0
    (grad,) = torch.autograd.grad(distance.sum(), student)
    assert torch.equal(grad[2], torch.zeros(6)) and grad.abs().max() < 10
    old = 1 - F.cosine_similarity(student, teacher, dim=1)
    (old_grad,) = torch.autograd.grad(old.sum(), student)
    assert old_grad[2].abs().max() > 1e4  # what the eps-clamped cosine gave a dead row


# --- one formula for one model and for N members --------------------------------------

MEMBER_LOSSES = [
    [HintonKD(2.0, 0.25), HintonKD(4.0, 0.9), HintonKD(1.0, 0.0)],
    [StandardisedKD(1.5, 0.5), StandardisedKD(3.0, 1.0)],
    [DKD(1.0, 8.0, 4.0, 1.0), DKD(0.5, 2.0, 1.0, 0.0), DKD(2.0, 1.0, 2.0, 3.0)],
    [CosineHidden(0.25), CosineHidden(0.0), CosineHidden(1.0)],
    [CrossEntropy(), CrossEntropy()],
]


@pytest.mark.parametrize("losses", MEMBER_LOSSES, ids=lambda losses: type(losses[0]).__name__)
def test_stacked_members_compute_what_each_member_computes_alone(losses):
    """Member i of a for_members loss on [N, B, C] logits gives, in float64, the value
    and gradient its own loss gives on its [B, C] slice."""
    n, b, c = len(losses), 6, 10
    gen = torch.Generator().manual_seed(3)
    student = (torch.randn(n, b, c, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(n, b, c, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (n, b), generator=gen)
    s_conv = torch.randn(n, b, 4, 2, 2, generator=gen, dtype=torch.float64).requires_grad_()
    t_conv = torch.randn(n, b, 8, 2, 2, generator=gen, dtype=torch.float64)
    s_conv.data[0, 1] = 0.0  # a dead feature row
    progress = Progress(epoch=1, epochs=3, step=2, steps_per_epoch=4)
    stacked = for_members(losses)
    together = stacked(LossInputs(student, labels, teacher, {"conv": s_conv}, {"conv": t_conv}, progress))
    assert together["loss"].shape == (n,)
    together["loss"].sum().backward()
    feature_grad = s_conv.grad if s_conv.grad is not None else torch.zeros_like(s_conv)
    grad_together, feature_grad_together = student.grad.clone(), feature_grad.clone()
    for i, loss in enumerate(losses):
        student.grad, s_conv.grad = None, None
        inputs = LossInputs(student[i], labels[i], teacher[i], {"conv": s_conv[i]}, {"conv": t_conv[i]}, progress)
        alone = loss(inputs)
        assert set(alone) == set(together)
        for name, value in alone.items():
            assert value.shape == () and torch.allclose(together[name][i], value, rtol=1e-12, atol=1e-12), name
        alone["loss"].backward()
        torch.testing.assert_close(grad_together[i], student.grad[i], rtol=1e-10, atol=1e-12)
        feature_grad = s_conv.grad if s_conv.grad is not None else torch.zeros_like(s_conv)
        torch.testing.assert_close(feature_grad_together[i], feature_grad[i], rtol=1e-10, atol=1e-12)


def test_stacking_refuses_mixed_methods_and_trainable_losses():
    with pytest.raises(ValueError, match="share one loss"):
        for_members([HintonKD(), DKD()])
    with pytest.raises(ValueError, match="trainable parameters"):
        for_members([FeatureRegressor(), FeatureRegressor()])


def test_a_zero_weight_is_exactly_cross_entropy_even_with_an_infinite_distillation_term():
    ce = torch.tensor(1.25, requires_grad=True)
    distill = torch.tensor(float("inf"))
    assert blend(0.0, distill, ce).item() == 1.25
    weights = torch.tensor([0.0, 0.5])
    mixed = blend(weights, torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert mixed.tolist() == [1.0, 2.0]


def test_each_method_names_its_terms():
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    conv = {"conv": torch.randn(4, 16, 2, 2)}
    inputs = LossInputs(logits, labels, teacher, conv, {"conv": torch.randn(4, 32, 2, 2)})
    expected = {
        CrossEntropy(): {"loss", "ce"},
        HintonKD(): {"loss", "ce", "kl"},
        StandardisedKD(): {"loss", "ce", "kl"},
        DKD(): {"loss", "ce", "tckd", "nckd"},
        CosineHidden(): {"loss", "ce", "cosine"},
        FeatureRegressor(): {"loss", "ce", "mse"},
    }
    for loss, names in expected.items():
        assert set(loss(inputs)) == names, type(loss).__name__


def test_the_protocol_names_the_method_that_broke_it():
    with pytest.raises(ValueError, match="HintonKD needs the teacher's outputs"):
        HintonKD()(LossInputs(torch.randn(2, 3), torch.tensor([0, 1])))

    class NoLoss(CrossEntropy):
        def terms(self, inputs):
            return {"ce": torch.zeros(())}

    with pytest.raises(KeyError, match="NoLoss.terms must return a 'loss' entry"):
        NoLoss()(LossInputs(torch.randn(2, 3), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="FeatureRegressor has trainable parameters"):
        for_members([FeatureRegressor(), FeatureRegressor()])


def test_stacked_hyperparameters_live_on_the_asked_device_in_float64():
    stacked = for_members([HintonKD(2.0, 0.1), HintonKD(3.0, 0.2)], device="meta")
    assert stacked.temperature.device.type == "meta" and stacked.alpha.dtype == torch.float64
    assert HintonKD(2.0, 0.1).temperature == 2.0  # the members are untouched


@pytest.mark.parametrize(
    "losses",
    [[HintonKD(3.3, 0.9), HintonKD(1.7, 0.3)], [DKD(0.7, 8.0, 3.3), DKD(1.0, 2.0, 1.7)],
     [CosineHidden(0.9), CosineHidden(0.3)]],
    ids=lambda losses: type(losses[0]).__name__,
)  # fmt: skip
def test_a_member_rounds_its_hyperparameters_as_its_single_run_does(losses):
    """In float32, the dtype training uses, a member's loss is its single run's to the
    bit: ``1 - alpha`` and ``T ** 2`` are computed in double on both paths and rounded
    once (rounded per member first, 1 - 0.9 differs from the single run's by 2e-7)."""
    n, b, c = len(losses), 8, 10
    gen = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(n, b, c, generator=gen) * 3, torch.randn(n, b, c, generator=gen) * 3
    labels = torch.randint(0, c, (n, b), generator=gen)
    s_conv, t_conv = torch.randn(n, b, 4, 2, 2, generator=gen), torch.randn(n, b, 8, 2, 2, generator=gen)
    progress = Progress(epoch=1, epochs=3, step=2, steps_per_epoch=4)
    together = for_members(losses)(LossInputs(student, labels, teacher, {"conv": s_conv}, {"conv": t_conv}, progress))
    for i, loss in enumerate(losses):
        alone = loss(LossInputs(student[i], labels[i], teacher[i], {"conv": s_conv[i]}, {"conv": t_conv[i]}, progress))
        assert together["loss"][i].item() == alone["loss"].item(), i
