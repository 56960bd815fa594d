import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import CrossEntropy, HintonKD, LossInputs, distillation_divergence


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
