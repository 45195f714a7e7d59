"""Class-balanced P x K batch sampling, for single-process and distributed training."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from recognite.utils.validate import check_int

__all__ = ["PKBatchSampler"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_int(value, name, minimum=minimum, message=f"{name} must be an integer >= {minimum}, got {value!r}")


def _group_indices(labels: Sequence[Hashable] | np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Dataset indices per label, labels in order of first appearance."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
        labels = labels.tolist()
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return [np.asarray(indices, dtype=np.int64) for indices in groups.values()]


class PKBatchSampler(Sampler[list[int]]):
    """Batches of ``P`` distinct labels with ``K`` items each (class-balanced sampling).

    Use it as the ``batch_sampler`` of a :class:`torch.utils.data.DataLoader`; each batch is a
    list of ``P * K`` dataset indices, label by label (the ``K`` indices of the first label,
    then those of the second, ...).

    Labels are visited in rounds: each round is a fresh permutation of all labels cut into
    groups of ``P`` (the last, incomplete group is filled with other labels of the round), so
    every label appears at least once per round and all ``P`` labels in a batch differ. Items
    of a label are drawn without replacement from a shuffled pool of its items, reshuffled when
    used up, so a label's items are used evenly; a label with fewer than ``K`` items repeats its
    items in the batch (sampling with replacement: each item then appears ``K // n`` or
    ``K // n + 1`` times).

    The batches depend only on ``seed`` and the epoch given to :meth:`set_epoch` (like
    :class:`torch.utils.data.DistributedSampler`, call it before each epoch to get different
    batches), never on the global random state.

    Distributed training: the epoch's batches are dealt out to the ``num_replicas`` processes in
    turn (rank ``r`` gets global batches ``r, r + R, r + 2R, ...``); every rank gets the same
    number of batches and no two ranks get the same batch. Batches that run at the same step on
    different ranks are consecutive batches of the epoch, usually of the same round, so they
    mostly hold different labels when ``num_labels >= P * num_replicas``.

    Args:
        labels: The label of every dataset item, ``(len(dataset),)``; any hashable values.
        p: Labels per batch, ``1 <= p <= number of distinct labels``.
        k: Items per label in a batch, ``>= 1``.
        num_batches: Batches per epoch over all ranks together. Default:
            ``len(labels) // (p * k)`` (at least 1), about one pass over the data.
        seed: Seed of the sampling; the same on every rank.
        drop_last: When ``num_batches`` is not a multiple of ``num_replicas``, give every rank
            ``num_batches // num_replicas`` batches (``True``) or
            ``ceil(num_batches / num_replicas)`` batches (``False``).
        num_replicas: Number of processes. Default: the world size of the initialized
            ``torch.distributed`` process group, else 1.
        rank: This process's rank in ``0..num_replicas-1``. Default: the rank in the
            initialized process group, else 0.

    Raises:
        ValueError: Empty ``labels``, ``p`` or ``k`` < 1, ``p`` larger than the number of
            distinct labels, bad ``num_batches``, ``num_replicas`` or ``rank``.

    Example:
        >>> sampler = PKBatchSampler(["a", "a", "b", "b", "c", "c", "c"], p=2, k=2, seed=1)
        >>> len(sampler)
        1
        >>> batch = next(iter(sampler))
        >>> len(batch), len({["a", "a", "b", "b", "c", "c", "c"][i] for i in batch})
        (4, 2)
    """

    def __init__(
        self,
        labels: Sequence[Hashable] | np.ndarray | torch.Tensor,
        p: int,
        k: int,
        num_batches: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.p = _check_int("p", p, 1)
        self.k = _check_int("k", k, 1)
        self.seed = _check_int("seed", seed, 0)
        self._groups = _group_indices(labels)
        self.num_items = sum(len(group) for group in self._groups)
        if self.num_items == 0:
            raise ValueError("labels is empty: there is nothing to sample")
        if self.p > self.num_labels:
            raise ValueError(
                f"p={self.p} labels per batch, but labels holds only {self.num_labels} distinct "
                f"labels; choose p <= {self.num_labels}"
            )
        if num_replicas is None or rank is None:
            dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if dist_ready else 1
            if rank is None:
                rank = torch.distributed.get_rank() if dist_ready else 0
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(
                f"rank must be in [0, {self.num_replicas - 1}] for num_replicas="
                f"{self.num_replicas}, got {self.rank}"
            )
        if num_batches is None:
            num_batches = max(1, self.num_items // self.batch_size)
        self.num_batches = _check_int("num_batches", num_batches, 1)
        self.drop_last = bool(drop_last)
        if self.drop_last:
            self.batches_per_rank = self.num_batches // self.num_replicas
        else:
            self.batches_per_rank = math.ceil(self.num_batches / self.num_replicas)
        if self.batches_per_rank == 0:
            raise ValueError(
                f"num_batches={self.num_batches} is fewer than num_replicas={self.num_replicas} "
                "with drop_last=True, so no rank would get a batch; raise num_batches or set "
                "drop_last=False"
            )
        self.epoch = 0

    @property
    def num_labels(self) -> int:
        """Number of distinct labels."""
        return len(self._groups)

    @property
    def batch_size(self) -> int:
        """Items per batch, ``p * k``."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed``, determines the batches of the next iteration."""
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        return self.batches_per_rank

    def _label_batches(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``(count, p)`` label ids: rounds of label permutations, ``p`` distinct per row."""
        num_labels, p = self.num_labels, self.p
        rows: list[np.ndarray] = []
        total = 0
        while total < count:
            perm = rng.permutation(num_labels)
            num_full = num_labels // p
            full = perm[: num_full * p].reshape(num_full, p)
            rows.append(full)
            total += num_full
            rest = perm[num_full * p :]
            if len(rest):
                fill = rng.choice(perm[: num_full * p], size=p - len(rest), replace=False)
                rows.append(np.concatenate([rest, fill])[None, :])
                total += 1
        return np.concatenate(rows)[:count]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.batches_per_rank * self.num_replicas
        label_batches = self._label_batches(rng, total)
        # Every rank draws all batches, so that the item pools evolve identically everywhere,
        # and keeps its own share.
        pools: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * self.num_labels
        positions = [0] * self.num_labels
        k = self.k
        for batch_index, batch_labels in enumerate(label_batches):
            keep = batch_index % self.num_replicas == self.rank
            batch: list[int] = []
            for label in batch_labels.tolist():
                group = self._groups[label]
                if len(group) < k:
                    reps = -(-k // len(group))
                    picks = np.concatenate([rng.permutation(group) for _ in range(reps)])[:k]
                else:
                    pool, pos = pools[label], positions[label]
                    if pos + k <= len(pool):
                        picks = pool[pos : pos + k]
                        positions[label] = pos + k
                    else:
                        # Start a new cycle through the label's items. The r items left over
                        # from the old cycle come first, the new cycle supplies k - r other
                        # items now and puts the left-over ones last.
                        rest = pool[pos:]
                        fresh = rng.permutation(group)
                        if len(rest):
                            fresh = fresh[~np.isin(fresh, rest)]
                        need = k - len(rest)
                        picks = np.concatenate([rest, fresh[:need]])
                        pools[label] = np.concatenate([fresh, rest])
                        positions[label] = need
                if keep:
                    batch.extend(picks.tolist())
            if keep:
                yield batch
