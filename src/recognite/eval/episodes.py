"""N-way K-shot episode accuracy from labelled embeddings (few-shot evaluation)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import as_labels, check_k
from .scores import _check_embeddings, batched_pairwise_scores, check_metric

__all__ = ["episode_accuracy"]


def episode_accuracy(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 1,
    num_episodes: int = 1000,
    groups: torch.Tensor | None = None,
    metric: str = "cosine",
    seed: int = 0,
    support_views: torch.Tensor | None = None,
    support_scoring: str = "max",
) -> dict[str, Any]:
    """Mean accuracy over random N-way K-shot episodes, with a 95% confidence interval.

    Each episode draws ``n_way`` classes (all from one group when ``groups`` is given, e.g. the
    characters of one Omniglot alphabet), ``k_shot`` support and ``n_query`` query samples per
    class, without overlap. Each query is classified by its most similar class prototype (the
    mean of the class's support embeddings; with ``k_shot=1`` this is 1-nearest-neighbour). A
    query counts as correct only when its class scores strictly higher than every other class
    (pessimistic ties, as :func:`~recognite.eval.accuracy`). Draws use a private
    ``torch.Generator`` seeded with ``seed``; the global RNG is untouched.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer class labels.
        n_way: classes per episode (at least 2).
        k_shot: support samples per class.
        n_query: query samples per class.
        num_episodes: number of episodes.
        groups: optional ``(N,)`` integer group of every sample; every class must lie in one
            group. Only groups with at least ``n_way`` usable classes are drawn (uniformly).
        metric: similarity metric (see :func:`~recognite.eval.pairwise_scores`).
        seed: seed of the episode sampler.
        support_views: optional ``(N, V, D)``: ``V`` embeddings of every sample used when it is
            a *support* sample (enrolment augmentation: e.g. views of the image); queries keep
            ``embeddings``. The same episodes are drawn with or without them.
        support_scoring: with ``support_views``: ``'max'`` scores a class by its best support
            view, ``'mean'`` by the prototype of all its support views.

    Returns:
        ``{'mean': float, 'ci95': float, 'accuracies': (num_episodes,) float64}``; ``ci95`` is the
        half-width ``1.96 * std / sqrt(num_episodes)`` (normal approximation, unbiased std;
        ``nan`` for a single episode).

    Raises:
        ValueError: fewer than ``n_way`` classes (in any group) have ``k_shot + n_query`` samples,
            or a class spans several groups.

    Example:
        >>> embs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> out = episode_accuracy(embs, torch.tensor([0, 0, 1, 1]), n_way=2, num_episodes=10)
        >>> out['mean'], out['ci95']
        (1.0, 0.0)
    """
    embeddings = _check_embeddings(embeddings, "embeddings")
    labels = as_labels(labels, "labels").to(embeddings.device)
    if labels.numel() != embeddings.shape[0]:
        raise ValueError(
            f"labels has {labels.numel()} entries but embeddings has {embeddings.shape[0]} rows"
        )
    check_k(n_way, "n_way")
    if n_way < 2:
        raise ValueError(f"n_way must be at least 2, got {n_way}")
    check_k(k_shot, "k_shot")
    check_k(n_query, "n_query")
    check_k(num_episodes, "num_episodes")
    check_metric(metric)
    if support_scoring not in ("max", "mean"):
        raise ValueError(f"support_scoring must be 'max' or 'mean', got {support_scoring!r}")
    if support_views is not None:
        if (not isinstance(support_views, torch.Tensor) or support_views.dim() != 3
                or support_views.shape[0] != embeddings.shape[0] or support_views.shape[2] != embeddings.shape[1]
                or support_views.shape[1] == 0):
            shape = tuple(support_views.shape) if isinstance(support_views, torch.Tensor) else type(support_views).__name__
            raise ValueError(f"support_views must have shape ({embeddings.shape[0]}, V, {embeddings.shape[1]}) "
                             f"with V >= 1, got {shape}")
        support_views = support_views.to(embeddings.device)
    per_class = k_shot + n_query
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, return_counts=True)
    members = dict(zip(classes.tolist(), order.split(counts.tolist())))
    usable = [c for c, n in zip(classes.tolist(), counts.tolist()) if n >= per_class]
    if groups is None:
        pools = [usable]
    else:
        groups = as_labels(groups, "groups").to(embeddings.device)
        if groups.numel() != labels.numel():
            raise ValueError(f"groups has {groups.numel()} entries but labels has {labels.numel()}")
        by_group: dict[int, list[int]] = {}
        for label in usable:
            label_groups = torch.unique(groups[members[label]])
            if label_groups.numel() != 1:
                raise ValueError(
                    f"class {label} spans several groups {label_groups.tolist()}; each class must "
                    f"belong to one group"
                )
            by_group.setdefault(int(label_groups[0]), []).append(label)
        pools = [pool for _, pool in sorted(by_group.items()) if len(pool) >= n_way]
    pools = [pool for pool in pools if len(pool) >= n_way]
    if not pools:
        where = "any group" if groups is not None else "the data"
        raise ValueError(
            f"{where} has fewer than n_way={n_way} classes with at least k_shot + n_query = "
            f"{per_class} samples ({len(usable)} such classes in total)"
        )
    generator = torch.Generator().manual_seed(seed)
    support_index = torch.empty((num_episodes, n_way, k_shot), dtype=torch.long)
    query_index = torch.empty((num_episodes, n_way, n_query), dtype=torch.long)
    for episode in range(num_episodes):
        pool = pools[int(torch.randint(len(pools), (1,), generator=generator))]
        chosen = torch.randperm(len(pool), generator=generator)[:n_way].tolist()
        for way, class_position in enumerate(chosen):
            index = members[pool[class_position]].cpu()
            picked = index[torch.randperm(index.numel(), generator=generator)[:per_class]]
            support_index[episode, way] = picked[:k_shot]
            query_index[episode, way] = picked[k_shot:]
    accuracies = torch.cat(
        [
            _episode_accuracies(embeddings, support, query, metric, support_views, support_scoring)
            for support, query in zip(support_index.split(256), query_index.split(256))
        ]
    )
    mean = float(accuracies.mean())
    ci95 = (
        1.96 * float(accuracies.std(unbiased=True)) / math.sqrt(num_episodes)
        if num_episodes > 1
        else float("nan")
    )
    return {"mean": mean, "ci95": ci95, "accuracies": accuracies}


def _episode_accuracies(
    embeddings: torch.Tensor, support_index: torch.Tensor, query_index: torch.Tensor, metric: str,
    support_views: torch.Tensor | None = None, support_scoring: str = "max",
) -> torch.Tensor:
    """Accuracy of each episode in a batch: ``support_index (E, W, K)``, ``query_index (E, W, M)``."""
    num_episodes, n_way, n_query = query_index.shape
    device = embeddings.device
    queries = embeddings[query_index.to(device)].reshape(num_episodes, n_way * n_query, -1)
    if support_views is None:
        prototypes = embeddings[support_index.to(device)].mean(dim=2)  # (E, W, D)
        scores = batched_pairwise_scores(queries, prototypes, metric)  # (E, W * M, W)
    elif support_scoring == "mean":
        prototypes = support_views[support_index.to(device)].flatten(2, 3).mean(dim=2)  # (E, W, D)
        scores = batched_pairwise_scores(queries, prototypes, metric)
    else:  # a class scores its best support view
        views = support_views[support_index.to(device)]  # (E, W, K, V, D)
        flat = views.reshape(num_episodes, -1, views.shape[-1])
        scores = batched_pairwise_scores(queries, flat, metric).reshape(num_episodes, n_way * n_query, n_way, -1)
        scores = scores.amax(dim=3)
    truth = torch.arange(n_way, device=device).repeat_interleave(n_query)
    true_class = truth.view(1, -1, 1).expand(num_episodes, -1, 1)
    true_score = scores.gather(2, true_class)
    others = scores.scatter(2, true_class, float("-inf")).amax(dim=2, keepdim=True)
    correct = (true_score > others).squeeze(2)  # strict: ties count as wrong
    return correct.double().mean(dim=1).cpu()
