"""Tests of recognite.losses against an independent float64 reference written with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from recognite.losses import (
    LOSS_NAMES,
    ArcFaceLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SubCenterArcFaceLoss,
    build_loss,
)

# Non-symmetric cosines: 3 samples, 4 classes, a tie in row 2, a target near -1 in row 1
# (theta + m > pi for m = 0.5) and a negative target cosine in row 2.
SCORES = [
    [0.81, -0.12, 0.33, 0.05],
    [0.40, -0.95, 0.10, 0.62],
    [0.20, 0.20, -0.30, 0.75],
]
TARGETS = [0, 1, 2]


def _ce(logits: list[float], target: int) -> float:
    """Cross-entropy of one row, in float64 with math only."""
    top = max(logits)
    lse = top + math.log(sum(math.exp(z - top) for z in logits))
    return lse - logits[target]


def _ref_loss(scores, targets, target_logit_fn, scale: float) -> list[float]:
    losses = []
    for row, t in zip(scores, targets):
        logits = [scale * c for c in row]
        logits[t] = scale * target_logit_fn(row[t])
        losses.append(_ce(logits, t))
    return losses


def _ref_arcface_target(c: float, m: float, easy: bool = False) -> float:
    theta = math.acos(c)
    if easy:
        return math.cos(theta + m) if c > 0 else c
    if theta + m <= math.pi:
        return math.cos(theta + m)
    return c - m * math.sin(m)


def _assert_matches(loss: torch.Tensor, expected: list[float], atol: float = 1e-4) -> None:
    torch.testing.assert_close(
        loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=atol
    )


def _tensors():
    return torch.tensor(SCORES, dtype=torch.float32), torch.tensor(TARGETS, dtype=torch.int64)


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
def test_norm_softmax_matches_reference(temperature):
    scores, targets = _tensors()
    loss = NormSoftmaxLoss(temperature=temperature, reduction="none")(scores, targets)
    expected = _ref_loss(SCORES, TARGETS, lambda c: c, 1.0 / temperature)
    _assert_matches(loss, expected, atol=1e-5)


def test_reductions():
    scores, targets = _tensors()
    expected = _ref_loss(SCORES, TARGETS, lambda c: c - 0.2, 10.0)
    mean = CosFaceLoss(scale=10.0, margin=0.2)(scores, targets)
    total = CosFaceLoss(scale=10.0, margin=0.2, reduction="sum")(scores, targets)
    assert mean.shape == ()
    assert mean.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert total.item() == pytest.approx(sum(expected), rel=1e-5)


@pytest.mark.parametrize("scale,margin", [(30.0, 0.35), (4.0, 0.1), (16.0, 0.0)])
def test_cosface_matches_reference(scale, margin):
    scores, targets = _tensors()
    loss = CosFaceLoss(scale=scale, margin=margin, reduction="none")(scores, targets)
    expected = _ref_loss(SCORES, TARGETS, lambda c: c - margin, scale)
    _assert_matches(loss, expected)


@pytest.mark.parametrize(
    "scale,margin,easy", [(30.0, 0.5, False), (8.0, 0.3, False), (8.0, 0.5, True)]
)
def test_arcface_matches_reference(scale, margin, easy):
    scores, targets = _tensors()
    loss_fn = ArcFaceLoss(scale=scale, margin=margin, easy_margin=easy, reduction="none")
    loss = loss_fn(scores, targets)
    expected = _ref_loss(SCORES, TARGETS, lambda c: _ref_arcface_target(c, margin, easy), scale)
    _assert_matches(loss, expected)


def test_arcface_fallback_branch_is_used():
    # Row 1 has target cosine -0.95 < cos(pi - 0.5) = -0.8776: theta + m > pi.
    assert math.acos(-0.95) + 0.5 > math.pi
    scores = torch.tensor([[-0.95, 0.1]])
    loss = ArcFaceLoss(scale=1.0, margin=0.5)(scores, torch.tensor([0]))
    fallback = -0.95 - 0.5 * math.sin(0.5)
    assert loss.item() == pytest.approx(_ce([fallback, 0.1], 0), rel=1e-6)
    # and not the plain formula cos(theta + m), which would turn upwards again
    wrong = math.cos(math.acos(-0.95) + 0.5)
    assert loss.item() != pytest.approx(_ce([wrong, 0.1], 0), rel=1e-3)


def test_zero_margin_losses_agree_with_norm_softmax():
    scores, targets = _tensors()
    reference = NormSoftmaxLoss(temperature=1 / 12.0)(scores, targets)
    torch.testing.assert_close(CosFaceLoss(scale=12.0, margin=0.0)(scores, targets), reference)
    torch.testing.assert_close(
        ArcFaceLoss(scale=12.0, margin=0.0)(scores, targets), reference, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("loss_cls", [CosFaceLoss, ArcFaceLoss])
def test_loss_increases_with_margin(loss_cls):
    scores, targets = _tensors()
    losses = [loss_cls(scale=10.0, margin=m)(scores, targets).item() for m in (0.0, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_subcenter_arcface_matches_reference_and_layout():
    # 2 samples, 3 classes, K = 2 sub-centers laid out [c0s0, c0s1, c1s0, c1s1, c2s0, c2s1]
    sub = [
        [0.10, 0.70, -0.30, 0.20, 0.05, -0.40],
        [0.30, -0.10, 0.55, 0.15, 0.60, 0.61],
    ]
    targets = [0, 2]
    per_class = [[max(row[2 * c], row[2 * c + 1]) for c in range(3)] for row in sub]
    assert per_class == [[0.70, 0.20, 0.05], [0.30, 0.55, 0.61]]
    loss_fn = SubCenterArcFaceLoss(num_subcenters=2, scale=20.0, margin=0.4, reduction="none")
    scores = torch.tensor(sub, requires_grad=True)
    torch.testing.assert_close(loss_fn.class_scores(scores.detach()), torch.tensor(per_class))
    loss = loss_fn(scores, torch.tensor(targets))
    expected = _ref_loss(per_class, targets, lambda c: _ref_arcface_target(c, 0.4), 20.0)
    _assert_matches(loss, expected)
    # only the best sub-center of each class receives a gradient
    loss.sum().backward()
    nonzero = (scores.grad != 0).tolist()
    assert nonzero == [
        [False, True, False, True, True, False],
        [True, False, True, False, False, True],
    ]


def test_num_outputs():
    assert NormSoftmaxLoss().num_outputs(7) == 7
    assert ArcFaceLoss().num_outputs(7) == 7
    assert SubCenterArcFaceLoss(num_subcenters=3).num_outputs(7) == 21
    with pytest.raises(ValueError, match="num_classes"):
        CosFaceLoss().num_outputs(0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_flow_and_are_finite_at_extreme_cosines(name):
    loss_fn = build_loss(name)
    num_classes = 4
    width = loss_fn.num_outputs(num_classes)
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(5, width, generator=gen) * 2 - 1
    raw[0, :] = 1.0  # exact cosines of +-1 at the clamp boundary
    raw[1, :] = -1.0
    scores = raw.clone().requires_grad_(True)
    targets = torch.tensor([0, 1, 3, 2, 1])
    loss = loss_fn(scores, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(scores.grad).all()
    assert scores.grad.abs().sum() > 0
    # rows away from +-1 get a gradient that lowers the loss along -grad
    with torch.no_grad():
        stepped = (raw - 1e-3 * scores.grad.sign()).clamp(-1, 1)
        assert loss_fn(stepped, targets) < loss


def test_learned_temperature_gets_gradient_matching_analytic():
    scores, targets = _tensors()
    loss_fn = NormSoftmaxLoss(temperature=0.25, learn_temperature=True)
    params = dict(loss_fn.named_parameters())
    assert list(params) == ["log_scale"]
    assert loss_fn.log_scale.item() == pytest.approx(math.log(4.0))
    assert loss_fn.temperature == pytest.approx(0.25)
    loss = loss_fn(scores, targets)
    loss.backward()
    # d/d(log s) of mean_i CE(s * cos_i) = s * mean_i (sum_j p_ij cos_ij - cos_i,t)
    s = 4.0
    expected = 0.0
    for row, t in zip(SCORES, TARGETS):
        exps = [math.exp(s * c) for c in row]
        probs = [e / sum(exps) for e in exps]
        expected += s * (sum(p * c for p, c in zip(probs, row)) - row[t])
    expected /= len(SCORES)
    assert loss_fn.log_scale.grad.item() == pytest.approx(expected, rel=1e-4)
    # one optimizer step changes the temperature, which stays positive
    torch.optim.SGD(loss_fn.parameters(), lr=10.0).step()
    assert loss_fn.temperature != pytest.approx(0.25)
    assert loss_fn.temperature > 0


def test_fixed_temperature_has_no_parameters_and_no_state():
    loss_fn = NormSoftmaxLoss(temperature=0.05)
    assert list(loss_fn.parameters()) == []
    assert loss_fn.temperature == pytest.approx(0.05)
    assert loss_fn.state_dict() == {}


def test_learned_temperature_round_trips_through_state_dict():
    trained = NormSoftmaxLoss(temperature=0.1, learn_temperature=True)
    with torch.no_grad():
        trained.log_scale.fill_(math.log(7.0))
    restored = NormSoftmaxLoss(temperature=0.1, learn_temperature=True)
    restored.load_state_dict(trained.state_dict())
    assert restored.temperature == pytest.approx(1 / 7.0)
    scores, targets = _tensors()
    expected = sum(_ref_loss(SCORES, TARGETS, lambda c: c, 7.0)) / 3
    assert restored(scores, targets).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_logits_are_float32_under_autocast(name):
    loss_fn = build_loss(name)
    scores = torch.tensor(SCORES, dtype=torch.bfloat16)
    if name == "subcenter_arcface":
        scores = scores.repeat_interleave(3, dim=1)
    targets = torch.tensor(TARGETS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(scores, targets)
    assert loss.dtype == torch.float32
    reference = loss_fn(scores.float(), targets)
    torch.testing.assert_close(loss, reference)


def test_half_precision_scores_do_not_overflow():
    # 0.99 / 0.05 = 19.8 is fine in fp16, but exp(19.8) overflows fp16 - it must not be used
    scores = torch.tensor([[0.99, -0.99, 0.5]], dtype=torch.float16)
    loss = NormSoftmaxLoss(temperature=0.05)(scores, torch.tensor([1]))
    assert torch.isfinite(loss)
    expected = _ce([float(c) / 0.05 for c in scores[0].float().tolist()], 1)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: NormSoftmaxLoss(temperature=0.0), "temperature"),
        (lambda: NormSoftmaxLoss(temperature=-0.1), "temperature"),
        (lambda: CosFaceLoss(margin=-0.1), "margin"),
        (lambda: CosFaceLoss(scale=0.0), "scale"),
        (lambda: ArcFaceLoss(margin=-0.01), "margin"),
        (lambda: ArcFaceLoss(margin=2.0), "margin"),
        (lambda: SubCenterArcFaceLoss(num_subcenters=0), "num_subcenters"),
        (lambda: SubCenterArcFaceLoss(num_subcenters=1.5), "num_subcenters"),
        (lambda: NormSoftmaxLoss(reduction="avg"), "reduction"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bad_inputs(name):
    loss_fn = build_loss(name)
    width = loss_fn.num_outputs(4)
    scores = torch.zeros(3, width)
    with pytest.raises(ValueError, match="batch size"):
        loss_fn(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        loss_fn(scores, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\].*\[4\]"):
        loss_fn(scores, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        loss_fn(scores, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(scores, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("name", ["cosface", "arcface", "subcenter_arcface"])
def test_margin_losses_reject_non_cosines(name):
    loss_fn = build_loss(name)
    scores = torch.zeros(2, loss_fn.num_outputs(3))
    scores[1, 0] = 3.5
    with pytest.raises(ValueError, match="cosines.*3.5"):
        loss_fn(scores, torch.tensor([0, 1]))


def test_subcenter_rejects_width_not_multiple_of_k():
    with pytest.raises(ValueError, match="num_subcenters=3"):
        SubCenterArcFaceLoss(num_subcenters=3)(torch.zeros(2, 7), torch.tensor([0, 1]))


def test_build_loss():
    assert isinstance(build_loss("norm_softmax"), NormSoftmaxLoss)
    assert isinstance(build_loss("CosFace"), CosFaceLoss)
    assert isinstance(build_loss("arcface", margin=0.3), ArcFaceLoss)
    sub = build_loss("subcenter-arcface", num_subcenters=2)
    assert isinstance(sub, SubCenterArcFaceLoss) and sub.num_subcenters == 2
    assert build_loss("norm_softmax", temperature=0.1).temperature == pytest.approx(0.1)
    with pytest.raises(ValueError, match="norm_softmax, cosface, arcface, subcenter_arcface"):
        build_loss("triplet")
    with pytest.raises(ValueError, match="Did you mean: arcface"):
        build_loss("arcfase")
    with pytest.raises(ValueError, match="cosface.*temperature"):
        build_loss("cosface", temperature=0.1)
