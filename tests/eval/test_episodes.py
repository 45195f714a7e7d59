"""N-way K-shot episodes."""

from __future__ import annotations

import math

import pytest
import torch

from recognite.eval import episode_accuracy


def _clustered(num_classes: int, per_class: int, spread: float, seed: int, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    embs = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return embs, labels


def test_separable_classes_are_always_right():
    embs, labels = _clustered(10, 4, spread=0.01, seed=0)
    out = episode_accuracy(embs, labels, n_way=5, k_shot=2, n_query=2, num_episodes=50, metric="euclid")
    assert out["mean"] == 1.0 and out["ci95"] == 0.0
    assert out["accuracies"].shape == (50,)


def test_random_embeddings_give_chance_and_ci_formula():
    gen = torch.Generator().manual_seed(1)
    embs, labels = torch.randn(600, 16, generator=gen), torch.arange(30).repeat_interleave(20)
    out = episode_accuracy(embs, labels, n_way=5, k_shot=1, n_query=5, num_episodes=400, seed=3)
    assert abs(out["mean"] - 0.2) < 0.03
    acc = out["accuracies"]
    assert out["ci95"] == pytest.approx(1.96 * acc.std(unbiased=True).item() / math.sqrt(400))
    assert out["mean"] == pytest.approx(acc.mean().item())
    again = episode_accuracy(embs, labels, n_way=5, k_shot=1, n_query=5, num_episodes=400, seed=3)
    assert torch.equal(again["accuracies"], acc)


def test_groups_draw_classes_from_one_group():
    # Two groups far apart; classes inside a group overlap heavily. Drawing all classes from one
    # group must be harder than drawing from anywhere (where classes of the other group help).
    gen = torch.Generator().manual_seed(2)
    group_centres = torch.tensor([[100.0, 0.0], [-100.0, 0.0]])
    labels = torch.arange(8).repeat_interleave(10)
    groups = labels // 4
    class_offsets = torch.randn(8, 2, generator=gen) * 0.5
    embs = group_centres[groups] + class_offsets[labels] + torch.randn(80, 2, generator=gen)
    mixed = episode_accuracy(embs, labels, n_way=2, k_shot=1, n_query=3, num_episodes=300, metric="euclid")
    grouped = episode_accuracy(embs, labels, n_way=2, k_shot=1, n_query=3, num_episodes=300,
                               metric="euclid", groups=groups)
    assert grouped["mean"] < mixed["mean"] - 0.1
    # Every episode of size 5 needs one group with 5 classes: impossible here.
    with pytest.raises(ValueError, match="fewer than n_way=5"):
        episode_accuracy(embs, labels, n_way=5, groups=groups)


def test_episode_errors():
    embs, labels = _clustered(3, 2, spread=0.1, seed=0)
    with pytest.raises(ValueError, match="fewer than n_way=3"):
        episode_accuracy(embs, labels, n_way=3, k_shot=2, n_query=1)
    with pytest.raises(ValueError, match="n_way must be at least 2"):
        episode_accuracy(embs, labels, n_way=1)
    with pytest.raises(ValueError, match="spans several groups"):
        episode_accuracy(embs, labels, n_way=2, groups=torch.tensor([0, 1, 0, 0, 1, 1]))


def test_identical_classes_tie_and_count_as_wrong():
    embs = torch.ones(6, 3)
    out = episode_accuracy(embs, torch.tensor([0, 0, 1, 1, 2, 2]), n_way=3, num_episodes=5)
    assert out["mean"] == 0.0
