"""Tests of the class-balanced P x K batch sampler."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from recognite.data.samplers import PKBatchSampler


def _labels(sizes: dict[str, int], seed: int = 0) -> list[str]:
    """Labels with the given item counts, in a shuffled order."""
    labels = [label for label, size in sizes.items() for _ in range(size)]
    rng = np.random.default_rng(seed)
    return [labels[i] for i in rng.permutation(len(labels))]


# unequal class sizes, two classes smaller than k=4, one of a single item
SIZES = {"ant": 9, "bee": 4, "cat": 2, "dog": 7, "eel": 1, "fox": 12, "gnu": 5}
LABELS = _labels(SIZES)


def _batches(sampler: PKBatchSampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


def test_every_batch_has_p_distinct_labels_with_k_items_each():
    sampler = PKBatchSampler(LABELS, p=3, k=4, num_batches=40, seed=5)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) == 40
    for batch in batches:
        assert len(batch) == 12
        assert all(0 <= i < len(LABELS) for i in batch)
        labels = [LABELS[i] for i in batch]
        counts = Counter(labels)
        assert len(counts) == 3
        assert set(counts.values()) == {4}
        # the K items of a label are consecutive in the batch
        assert [labels[j] for j in range(0, 12, 4)] == list(dict.fromkeys(labels))
        for label, start in zip(labels[::4], range(0, 12, 4)):
            items = batch[start : start + 4]
            if SIZES[label] >= 4:
                assert len(set(items)) == 4, (label, items)  # no repeats when not needed
            else:
                # fewer than K items: every item, each K // n or K // n + 1 times
                per_item = Counter(items)
                assert len(per_item) == SIZES[label]
                assert set(per_item.values()) <= {4 // SIZES[label], 4 // SIZES[label] + 1}


def test_labels_and_items_are_used_evenly():
    sampler = PKBatchSampler(LABELS, p=3, k=4, num_batches=70, seed=1)
    batches = _batches(sampler)
    label_counts = Counter(LABELS[batch[j]] for batch in batches for j in range(0, 12, 4))
    # 70 batches x 3 labels over 7 labels in rounds: each label 30 times, give or take a round
    assert set(label_counts) == set(SIZES)
    assert max(label_counts.values()) - min(label_counts.values()) <= 7
    # within a label, items are drawn in full cycles: counts differ by at most one
    item_counts = Counter(i for batch in batches for i in batch)
    for label, size in SIZES.items():
        if size >= 4:
            counts = [item_counts[i] for i, lab in enumerate(LABELS) if lab == label]
            assert max(counts) - min(counts) <= 1, (label, counts)


def test_deterministic_for_seed_and_epoch():
    first = _batches(PKBatchSampler(LABELS, p=3, k=2, num_batches=10, seed=3))
    again = _batches(PKBatchSampler(LABELS, p=3, k=2, num_batches=10, seed=3))
    assert first == again
    other_seed = _batches(PKBatchSampler(LABELS, p=3, k=2, num_batches=10, seed=4))
    assert other_seed != first

    sampler = PKBatchSampler(LABELS, p=3, k=2, num_batches=10, seed=3)
    assert _batches(sampler) == _batches(sampler)  # same epoch, same batches
    sampler.set_epoch(1)
    epoch1 = _batches(sampler)
    assert epoch1 != first
    sampler.set_epoch(2)
    assert _batches(sampler) not in (first, epoch1)
    sampler.set_epoch(0)
    assert _batches(sampler) == first


def test_global_rng_untouched_and_irrelevant():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    batches = _batches(PKBatchSampler(LABELS, p=2, k=3, num_batches=8, seed=0))
    assert torch.equal(torch.get_rng_state(), states[0])
    after_np = np.random.get_state()
    assert after_np[0] == states[1][0] and np.array_equal(after_np[1], states[1][1])
    assert after_np[2:] == states[1][2:]
    assert random.getstate() == states[2]
    torch.manual_seed(999)
    np.random.seed(999)
    assert _batches(PKBatchSampler(LABELS, p=2, k=3, num_batches=8, seed=0)) == batches


@pytest.mark.parametrize("drop_last,per_rank", [(True, 3), (False, 4)])
def test_ranks_get_disjoint_equal_shares(drop_last, per_rank):
    # 12 labels, p=4, 3 ranks: one round of labels = 3 batches = one step on all ranks
    labels = _labels({f"c{i:02d}": 3 + i % 4 for i in range(12)}, seed=2)
    num_replicas = 3
    shares = [
        _batches(
            PKBatchSampler(
                labels,
                p=4,
                k=2,
                num_batches=11,
                seed=7,
                drop_last=drop_last,
                num_replicas=num_replicas,
                rank=rank,
            )
        )
        for rank in range(num_replicas)
    ]
    assert [len(s) for s in shares] == [per_rank] * num_replicas
    for rank in range(num_replicas):
        sampler = PKBatchSampler(
            labels,
            p=4,
            k=2,
            num_batches=11,
            seed=7,
            drop_last=drop_last,
            num_replicas=num_replicas,
            rank=rank,
        )
        assert len(sampler) == per_rank
    # rank r holds global batches r, r + R, ...: the same as one process drawing them all
    single = _batches(
        PKBatchSampler(
            labels, p=4, k=2, num_batches=per_rank * num_replicas, seed=7, num_replicas=1, rank=0
        )
    )
    for rank, share in enumerate(shares):
        assert share == single[rank::num_replicas]
    all_batches = [tuple(b) for s in shares for b in s]
    assert len(set(all_batches)) == len(all_batches)
    # batches of the same step hold different labels on different ranks
    for step in range(per_rank):
        step_labels = [{labels[i] for i in share[step]} for share in shares]
        assert len(set().union(*step_labels)) == 4 * num_replicas


def test_defaults_follow_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    sampler = PKBatchSampler(LABELS, p=2, k=2, num_batches=9)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (4, 2, 2)


def test_defaults_without_distributed():
    sampler = PKBatchSampler(LABELS, p=2, k=3)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert len(sampler) == len(LABELS) // 6 == 6
    assert sampler.batch_size == 6 and sampler.num_labels == 7


def test_tensor_and_numpy_labels_and_dataloader():
    int_labels = [3, 1, 3, 2, 1, 3, 2, 2, 1, 1, 0, 0]
    expected = _batches(PKBatchSampler(int_labels, p=2, k=2, num_batches=5, seed=11))
    for labels in (torch.tensor(int_labels), np.array(int_labels)):
        assert _batches(PKBatchSampler(labels, p=2, k=2, num_batches=5, seed=11)) == expected
    dataset = TensorDataset(torch.arange(12), torch.tensor(int_labels))
    loader = DataLoader(
        dataset, batch_sampler=PKBatchSampler(int_labels, p=2, k=2, num_batches=5, seed=11)
    )
    seen = [(indices.tolist(), labels.tolist()) for indices, labels in loader]
    assert [indices for indices, _ in seen] == expected
    for indices, labels in seen:
        assert labels == [int_labels[i] for i in indices]
        assert len(set(labels)) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(p=8, k=2), r"p=8.*only 7 distinct"),
        (dict(p=0, k=2), "p must be"),
        (dict(p=2, k=0), "k must be"),
        (dict(p=2, k=2.5), "k must be"),
        (dict(p=2, k=2, num_batches=0), "num_batches"),
        (dict(p=2, k=2, num_replicas=0, rank=0), "num_replicas"),
        (dict(p=2, k=2, num_replicas=2, rank=2), r"rank must be in \[0, 1\]"),
        (dict(p=2, k=2, num_batches=3, num_replicas=4, rank=0), "drop_last"),
        (dict(p=2, k=2, seed=-1), "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKBatchSampler(LABELS, **kwargs)


def test_bad_labels_and_epoch():
    with pytest.raises(ValueError, match="empty"):
        PKBatchSampler([], p=1, k=1)
    with pytest.raises(ValueError, match="one-dimensional"):
        PKBatchSampler(torch.zeros(3, 2), p=1, k=1)
    with pytest.raises(ValueError, match="epoch"):
        PKBatchSampler(LABELS, p=1, k=1).set_epoch(-1)
