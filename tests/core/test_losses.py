"""Values of the tempered KL and of the KD objective, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.losses import KDLoss, KDLossParams, kl_rows, tempered_probs

LN2, LN3 = math.log(2.0), math.log(3.0)


# Student logits chosen so that the tempered softmax has round values:
#   row 0: uniform at every tau
#   row 1: softmax([0, 2 ln 2, 2 ln 3])     = [1, 4, 9] / 14  at tau = 1
#          softmax([0, 2 ln 2, 2 ln 3] / 2) = [1, 2, 3] / 6   at tau = 2
STUDENT = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2 * LN2, 2 * LN3]])
TEACHER = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])

# KL(p || q) = sum_i p_i ln(p_i / q_i), written out term by term.
ROW0 = 0.5 * math.log(0.5 / (1 / 3)) + 0.25 * math.log(0.25 / (1 / 3)) * 2  # = 0.5 ln 1.125
ROW1_TAU1 = 0.2 * math.log(0.2 / (1 / 14)) + 0.3 * math.log(0.3 / (4 / 14)) + 0.5 * math.log(0.5 / (9 / 14))
ROW1_TAU2 = 0.2 * math.log(0.2 / (1 / 6)) + 0.3 * math.log(0.3 / (2 / 6)) + 0.5 * math.log(0.5 / (3 / 6))


def _task(name: str, classes: list[str], weight: float = 1.0) -> ClassificationTask:
    task = ClassificationTask(name, ClassificationParams(weight=weight, hidden=0))
    task.fit(classes)
    return task


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy, -z_y + log sum_j exp z_j, written independently of F.cross_entropy."""
    return -logits.double().gather(1, y[:, None]).squeeze(1) + logits.double().exp().sum(1).log()


def _kl(z: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row KL(p || softmax(z / tau)) in float64 from its definition."""
    z, p = z.double(), p.double()
    q = (z / tau).exp() / (z / tau).exp().sum(1, keepdim=True)
    return torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p)).sum(1)


# -- kl_rows -------------------------------------------------------------------------------

def test_kl_of_identical_distributions_is_zero():
    torch.manual_seed(0)
    z = torch.randn(5, 7) * 3
    for tau in (0.5, 1.0, 4.0):
        kl = kl_rows(z, tempered_probs(z, tau), tau)
        assert torch.allclose(kl, torch.zeros(5), atol=1e-6)


def test_the_hand_numbers_are_what_they_claim():
    assert ROW0 == pytest.approx(0.5 * math.log(1.125))
    assert ROW1_TAU2 == pytest.approx(0.2 * math.log(1.2) + 0.3 * math.log(0.9))
    assert torch.allclose(tempered_probs(STUDENT, 1.0)[1], torch.tensor([1, 4, 9]) / 14.0)
    assert torch.allclose(tempered_probs(STUDENT, 2.0)[1], torch.tensor([1, 2, 3]) / 6.0)


@pytest.mark.parametrize("tau, expected", [(1.0, [ROW0, ROW1_TAU1]), (2.0, [ROW0, ROW1_TAU2])])
def test_kl_rows_matches_hand_computation(tau, expected):
    kl = kl_rows(STUDENT, TEACHER, tau)
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)
    # Spelled out once, so a reader sees the magnitudes.
    assert kl[0].item() == pytest.approx(0.0588915, abs=1e-6)
    if tau == 1.0:
        assert kl[1].item() == pytest.approx(0.0949037, abs=1e-6)
    else:
        assert kl[1].item() == pytest.approx(0.0048562, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 10.0])
def test_kl_rows_matches_torch_kl_div_batchmean(tau):
    torch.manual_seed(1)
    b, c = 6, 5
    z = torch.randn(b, c) * 2
    p = tempered_probs(torch.randn(b, c) * 2, tau)
    batchmean = F.kl_div(F.log_softmax(z / tau, dim=-1), p, reduction="batchmean")
    rows = kl_rows(z, p, tau)
    assert rows.mean().item() == pytest.approx(batchmean.item(), rel=1e-5, abs=1e-7)
    # batchmean is the per-row sum averaged over rows: times B it is the total sum.
    total = F.kl_div(F.log_softmax(z / tau, dim=-1), p, reduction="sum")
    assert (batchmean * b).item() == pytest.approx(total.item(), rel=1e-5)
    assert rows.sum().item() == pytest.approx(total.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(rows.double(), _kl(z, p, tau), atol=1e-5)


def test_reduction_mean_divides_by_the_number_of_classes():
    """The trap in DESIGN.md: 'mean' averages over B*C elements, so it is batchmean / C."""
    torch.manual_seed(2)
    b, c = 4, 7
    z, p = torch.randn(b, c), tempered_probs(torch.randn(b, c), 1.0)
    log_q = F.log_softmax(z, dim=-1)
    with pytest.warns(UserWarning):  # torch itself warns about this reduction
        mean = F.kl_div(log_q, p, reduction="mean")
    batchmean = F.kl_div(log_q, p, reduction="batchmean")
    assert (c * mean).item() == pytest.approx(batchmean.item(), rel=1e-5)
    assert kl_rows(z, p, 1.0).mean().item() == pytest.approx(batchmean.item(), rel=1e-5)
    assert kl_rows(z, p, 1.0).mean().item() != pytest.approx(mean.item(), rel=1e-2)


def test_teacher_zeros_give_finite_values_and_gradients():
    z = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    kl = kl_rows(z, p, 1.0)
    assert torch.isfinite(kl).all()
    # With p one-hot the KL is -log q_0; the zero classes contribute nothing.
    assert kl[0].item() == pytest.approx(-F.log_softmax(z[0].detach(), -1)[0].item(), rel=1e-6)
    assert kl[1].item() == pytest.approx(0.5 * math.log(0.5 / (1 / 3)) * 2, rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(z.grad).all()
    # d/dz sum_rows KL = q - p at tau = 1.
    assert torch.allclose(z.grad, F.softmax(z.detach(), -1) - p, atol=1e-6)


def test_kl_rows_keeps_leading_axes_of_sequence_logits():
    torch.manual_seed(3)
    z = torch.randn(2, 4, 6)
    p = tempered_probs(torch.randn(2, 4, 6), 2.0)
    expected = _kl(z.reshape(8, 6), p.reshape(8, 6), 2.0).reshape(2, 4)
    assert torch.allclose(kl_rows(z, p, 2.0).double(), expected, atol=1e-6)


# -- KDLoss --------------------------------------------------------------------------------

@pytest.fixture
def two_tasks():
    # lambda_a = 1, lambda_b = 0.5
    return {"a": _task("a", ["x", "y", "z"], weight=1.0), "b": _task("b", ["u", "v"], weight=0.5)}


LOGITS = {
    "a": torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0]]),
    "b": torch.tensor([[1.0, -1.0], [0.0, 2.0], [0.3, 0.3]]),
}
# Task b's row 1 has no label (its y value is arbitrary and must not matter).
TARGETS = {
    "a": {"y": torch.tensor([0, 1, 2]), "present": torch.tensor([True, True, True])},
    "b": {"y": torch.tensor([0, 0, 1]), "present": torch.tensor([True, False, True])},
}


def _soft(tau: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    teacher_logits = {
        "a": torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]),
        "b": torch.tensor([[0.0, 1.0], [2.0, 0.0], [-1.0, 1.0]]),
    }
    return {name: {"probs": tempered_probs(z, tau[name])} for name, z in teacher_logits.items()}


def test_supervised_loss_is_weighted_mean_ce_over_present_rows(two_tasks):
    loss, parts = KDLoss(KDLossParams())(two_tasks, LOGITS, TARGETS, None, alpha=0.95, tau={})
    ce_a = _ce(LOGITS["a"], TARGETS["a"]["y"])
    ce_b = _ce(LOGITS["b"], TARGETS["b"]["y"])
    hard_a = ce_a.mean()                        # 3 labeled rows
    hard_b = (ce_b[0] + ce_b[2]) / 2            # 2 labeled rows: row 1 is left out of sum and count
    # Hand numbers for the first row of a: -2 + ln(e^2 + 1 + e^-1).
    assert ce_a[0].item() == pytest.approx(-2 + math.log(math.exp(2) + 1 + math.exp(-1)))
    assert parts["a"].item() == pytest.approx(hard_a.item(), rel=1e-6)
    assert parts["b"].item() == pytest.approx(hard_b.item(), rel=1e-6)
    assert loss.item() == pytest.approx((1.0 * hard_a + 0.5 * hard_b).item(), rel=1e-6)


def test_supervised_loss_can_normalise_by_batch_size(two_tasks):
    loss, _ = KDLoss(KDLossParams(normalize_by_present=False))(two_tasks, LOGITS, TARGETS, None, 0.0, {})
    ce_a = _ce(LOGITS["a"], TARGETS["a"]["y"])
    ce_b = _ce(LOGITS["b"], TARGETS["b"]["y"])
    expected = ce_a.sum() / 3 + 0.5 * (ce_b[0] + ce_b[2]) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unlabeled_loss_is_weighted_tau_squared_kl(two_tasks):
    tau = {"a": 2.0, "b": 5.0}
    soft = _soft(tau)
    loss, parts = KDLoss(KDLossParams())(two_tasks, LOGITS, None, soft, alpha=0.95, tau=tau)
    kl_a = _kl(LOGITS["a"], soft["a"]["probs"], 2.0).mean()
    kl_b = _kl(LOGITS["b"], soft["b"]["probs"], 5.0).mean()
    assert parts["a"].item() == pytest.approx(4.0 * kl_a.item(), rel=1e-5)
    assert parts["b"].item() == pytest.approx(25.0 * kl_b.item(), rel=1e-5)
    # alpha plays no part without labels.
    assert loss.item() == pytest.approx((4.0 * kl_a + 0.5 * 25.0 * kl_b).item(), rel=1e-5)


def test_labeled_distillation_mixes_ce_and_kl(two_tasks):
    tau = {"a": 2.0, "b": 1.0}
    alpha = 0.95
    soft = _soft(tau)
    loss, _ = KDLoss(KDLossParams())(two_tasks, LOGITS, TARGETS, soft, alpha=alpha, tau=tau)
    ce_a = _ce(LOGITS["a"], TARGETS["a"]["y"])
    ce_b = _ce(LOGITS["b"], TARGETS["b"]["y"])
    term_a = (1 - alpha) * ce_a.mean() + alpha * 4.0 * _kl(LOGITS["a"], soft["a"]["probs"], 2.0).mean()
    term_b = (1 - alpha) * (ce_b[0] + ce_b[2]) / 2 + alpha * 1.0 * _kl(LOGITS["b"], soft["b"]["probs"], 1.0).mean()
    assert loss.item() == pytest.approx((term_a + 0.5 * term_b).item(), rel=1e-5)


def test_row_without_label_contributes_only_its_kl(two_tasks):
    tau = {"a": 2.0, "b": 3.0}
    soft = _soft(tau)
    loss_fn = KDLoss(KDLossParams())
    base, _ = loss_fn(two_tasks, LOGITS, TARGETS, soft, alpha=0.5, tau=tau)
    for other in (1, 0):  # any value of the missing label
        changed = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in TARGETS.items()}
        changed["b"]["y"][1] = other
        again, _ = loss_fn(two_tasks, LOGITS, changed, soft, alpha=0.5, tau=tau)
        assert again.item() == base.item()
    # ... but its KL still counts: changing the row's logits changes the loss.
    moved = dict(LOGITS, b=LOGITS["b"].clone())
    moved["b"][1] = torch.tensor([3.0, -3.0])
    shifted, _ = loss_fn(two_tasks, moved, TARGETS, soft, alpha=0.5, tau=tau)
    kl_before = _kl(LOGITS["b"], soft["b"]["probs"], 3.0)
    kl_after = _kl(moved["b"], soft["b"]["probs"], 3.0)
    expected = 0.5 * 0.5 * 9.0 * (kl_after[1] - kl_before[1]) / 3  # lambda_b * alpha * tau^2 * batchmean
    assert (shifted - base).item() == pytest.approx(expected.item(), rel=1e-4)


def test_kd_gradient_is_tau_times_q_minus_p(two_tasks):
    """d/dz [tau^2 KL(p_tau || softmax(z / tau))] = tau (q - p): checked against autograd."""
    tasks = {"a": two_tasks["a"]}
    torch.manual_seed(4)
    for tau in (0.5, 1.0, 4.0, 10.0):
        z = (torch.randn(4, 3) * 2).requires_grad_(True)
        p = tempered_probs(torch.randn(4, 3) * 2, tau)
        loss, _ = KDLoss(KDLossParams())(tasks, {"a": z}, None, {"a": {"probs": p}}, 1.0, {"a": tau})
        loss.backward()
        q = F.softmax(z.detach() / tau, -1)
        assert torch.allclose(z.grad, tau * (q - p) / 4, atol=1e-6)  # / B: batchmean


def test_tau_squared_keeps_gradient_size_as_tau_grows():
    """For large tau, tau^2 KL has the gradient (d - mean(d)) / C with d = z_s - z_t (Hinton et al.),
    independent of tau (the error shrinks as 1/tau); without tau^2 the gradient would vanish as 1/tau^2."""
    torch.manual_seed(5)
    c = 6
    z_t = torch.randn(3, c)
    z_s0 = torch.randn(3, c)
    d = z_s0 - z_t
    limit = (d - d.mean(-1, keepdim=True)) / c
    errors = {}
    for tau in (20.0, 2000.0):
        z_s = z_s0.clone().requires_grad_(True)
        (tau ** 2 * kl_rows(z_s, tempered_probs(z_t, tau), tau).sum()).backward()
        errors[tau] = (z_s.grad - limit).abs().max().item()
        unscaled = torch.autograd.grad(kl_rows(z_s, tempered_probs(z_t, tau), tau).sum(), z_s)[0]
        assert torch.allclose(unscaled * tau ** 2, z_s.grad, rtol=0.0, atol=1e-3)  # float32 q - p
        assert unscaled.norm() < 1.5 * limit.norm() / tau ** 2
    assert errors[20.0] < 0.1 * limit.abs().max().item()
    assert errors[2000.0] < 1e-3
    assert errors[2000.0] < errors[20.0] / 20
