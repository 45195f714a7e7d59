"""Recognition metrics of a model bundle on a labelled CSV (the library side of ``recognite evaluate``)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pandas as pd
import torch

from recognite.bundle import Bundle, load_bundle, write_threshold
from recognite.data import load_csv, split_gallery_query
from recognite.eval import episode_accuracy
from recognite.eval.summary import summary_metrics
from recognite.gallery.k_reciprocal import (
    KReciprocal,
    KReciprocalGallery,
    warn_if_degenerate,
)
from recognite.gallery.rerank import query_expansion as expand_queries
from recognite.utils.reranking import choose_reranking
from recognite.utils.validate import check_cosine_threshold, check_int

__all__ = ["calibrate_bundle", "evaluate_bundle"]

logger = logging.getLogger(__name__)

_FROM_BUNDLE = "bundle"


def _split(data_csv: str | os.PathLike, gallery_csv: str | os.PathLike | None, num_refs: int, ref_seed: int,
           image_key: str, label_key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = load_csv(data_csv, image_key, label_key)
    if gallery_csv:
        df_gallery = load_csv(gallery_csv, image_key, label_key)
        shared = set(df_gallery[image_key]) & set(df[image_key])
        if shared:
            logger.warning("%d images are both gallery references (%s) and queries (%s), e.g. %s: each finds itself, "
                           "so top-1 and mAP are inflated. Use disjoint CSVs.", len(shared), gallery_csv, data_csv,
                           sorted(shared)[0])
        return df_gallery, df
    df_gallery, df_query = split_gallery_query(df, num_refs=num_refs, seed=ref_seed, label_key=label_key)
    if len(df_query) == 0:
        raise ValueError(f"No query images: every label of {data_csv} has at most --num-refs {num_refs} images.")
    return df_gallery, df_query


def _episodes(embs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, torch.Tensor],
              frames: tuple[pd.DataFrame, pd.DataFrame], episodes: int, n_way: int, k_shot: int,
              group_key: str | None, seed: int, support_views: torch.Tensor | None = None,
              support_scoring: str = "max") -> dict[str, float]:
    groups = None
    if group_key:
        for frame in frames:
            if group_key not in frame.columns:
                raise ValueError(f"group_key {group_key!r} names no column of the CSV; its columns are "
                                 f"{list(frame.columns)}.")
        values = list(frames[0][group_key]) + list(frames[1][group_key])
        group_ids = {g: i for i, g in enumerate(sorted(set(values)))}
        groups = torch.tensor([group_ids[g] for g in values])
    result = episode_accuracy(torch.cat(embs), torch.cat(labels), n_way=n_way, k_shot=k_shot,
                              num_episodes=episodes, groups=groups, seed=seed, support_views=support_views,
                              support_scoring=support_scoring)
    return {f"{n_way}-way {k_shot}-shot": result["mean"], f"{n_way}-way {k_shot}-shot ci95": result["ci95"]}


def _embed_split(bundle: Bundle, frames: tuple[pd.DataFrame, pd.DataFrame], image_key: str, label_key: str,
                 batch_size: int, num_workers: int, progress: bool, tta: bool = True) -> tuple[list, tuple, tuple]:
    """Label names, ``(gallery, query)`` integer labels and ``(gallery, query)`` embeddings."""
    names = sorted(set(frames[0][label_key]) | set(frames[1][label_key]))
    to_int = {name: i for i, name in enumerate(names)}
    labels = tuple(torch.tensor([to_int[v] for v in frame[label_key]]) for frame in frames)
    embs = tuple(bundle.embed(list(frame[image_key]), batch_size=batch_size, num_workers=num_workers,
                              progress=progress, tta=tta) for frame in frames)
    return names, labels, embs


def _reference_views(bundle: Bundle, frame: pd.DataFrame, image_key: str, batch_size: int, num_workers: int,
                     progress: bool, tta: bool) -> torch.Tensor:
    """``(N, K, D)`` rows of the images as the bundle's enrolment augmentation enrols them."""
    return bundle.embed_references(list(frame[image_key]), batch_size=batch_size, num_workers=num_workers,
                                   progress=progress, tta=tta)


def _gallery_side(bundle: Bundle, df_gallery: pd.DataFrame, plain: torch.Tensor, enrol: bool, image_key: str,
                  batch_size: int, num_workers: int, progress: bool, tta: bool) -> torch.Tensor:
    """The gallery as enrolled: ``plain`` (``(G, D)``, as queries) without enrolment augmentation,
    else ``(G, D)`` mean-of-views prototypes or ``(G, K, D)`` views (scored by the best)."""
    if not enrol or bundle.enrolment_augmentation is None:
        return plain
    views = _reference_views(bundle, df_gallery, image_key, batch_size, num_workers, progress, tta)
    return views.squeeze(1) if views.shape[1] == 1 else views


def evaluate_bundle(
    bundle: Bundle | str | os.PathLike,
    data_csv: str | os.PathLike,
    gallery_csv: str | os.PathLike | None = None,
    num_refs: int = 1,
    ref_seed: int = 0,
    threshold: float | None | str = _FROM_BUNDLE,
    episodes: int = 0,
    n_way: int = 5,
    k_shot: int = 1,
    group_key: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    tta: bool = True,
    enrol: bool = True,
    query_expansion: int = 0,
    qe_alpha: float = 3.0,
    k_reciprocal: KReciprocal | None = None,
    rerank: bool = True,
) -> dict[str, Any]:
    """Embed the gallery and query images with a bundle and compute every recognition metric.

    The CSV is split per label into ``num_refs`` gallery references and queries (as in training
    validation), or ``gallery_csv`` gives the references. Metrics come from
    :func:`recognite.eval.summary.summary_metrics`, the function training validation and the
    report use, with the open-set convention of :mod:`recognite.eval.open_set`.

    Args:
        bundle: A loaded :class:`~recognite.bundle.Bundle` or a bundle folder.
        data_csv: CSV of labelled images (the queries, or queries + references).
        gallery_csv: Separate CSV of reference images.
        num_refs: References per label when splitting ``data_csv``.
        ref_seed: Seed of the reference choice and of the episodes.
        threshold: Open-set threshold (cosine); ``'bundle'`` (default): the bundle's; ``None``: none.
        episodes: Also run this many N-way K-shot episodes (0: none).
        n_way: Classes per episode.
        k_shot: References per class in an episode.
        group_key: CSV column grouping labels; episodes draw their classes from one group.
        image_key: CSV column of the image paths.
        label_key: CSV column of the labels.
        batch_size: Images per forward pass.
        num_workers: Data-loading worker processes.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``... (used when ``bundle`` is a folder).
        progress: Show progress bars while embedding.
        tta: Use the bundle's test-time augmentation, if it has one (False: each image alone).
        enrol: Enrol the references (and, in episodes, the support images) with the bundle's
            enrolment augmentation, if it has one (False: as queries).
        query_expansion: Expand each query with this many nearest gallery rows before scoring
            (:func:`recognite.gallery.rerank.query_expansion`; 0 = off).
        qe_alpha: The weight exponent of query expansion.
        k_reciprocal: Re-rank every query's scores by k-reciprocal neighbours
            (:mod:`recognite.gallery.k_reciprocal`), inside the bounded-memory engine; the
            open-set rates (``DIR``, ``FAR``) are then left out, because the threshold is a cosine
            similarity. Not with a multi-view enrolment (``'max'``). Episodes are not re-ranked.
        rerank: When the call asks for no re-ranking, apply the bundle's stored one, if any
            (False: none).

    Returns:
        Dict: ``num_gallery``, ``num_queries``, ``num_labels``, ``top1``, ``top5``/``top10`` and
        ``recall@k`` (for the k not above the number of gallery labels), ``mAP``, ``MAP@R``,
        ``R-precision``, ``hard_pos_mean``, ``hard_neg_mean``; with a threshold ``threshold``,
        ``DIR``, ``FAR``; with ``episodes`` the episode accuracy and its 95 % interval.

    Raises:
        ValueError: Bad arguments, no queries, a ``group_key`` that names no column.
        FileNotFoundError: Missing CSV or images.
    """
    num_refs = check_int(num_refs, "num_refs", minimum=1)
    check_int(episodes, "episodes", minimum=0)
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, device=device)
    if isinstance(threshold, str) and threshold == _FROM_BUNDLE:
        threshold = bundle.threshold
    threshold = check_cosine_threshold(threshold)
    df_gallery, df_query = _split(data_csv, gallery_csv, num_refs, ref_seed, image_key, label_key)
    chosen = choose_reranking(bundle.reranking, rerank, query_expansion, qe_alpha, k_reciprocal)
    query_expansion, qe_alpha, k_reciprocal = chosen.query_expansion, chosen.qe_alpha, chosen.k_reciprocal
    augmentation = bundle.enrolment_augmentation if enrol else None
    if k_reciprocal is not None and augmentation is not None and augmentation.scoring == "max":
        raise ValueError("k_reciprocal re-ranks one row per gallery item: it cannot be combined with the bundle's "
                         "multi-view enrolment (scoring 'max'); pass enrol=False (--no-enrol-aug) or leave it off.")
    names, labels, embs = _embed_split(bundle, (df_gallery, df_query), image_key, label_key, batch_size,
                                       num_workers, progress, tta)
    gallery = _gallery_side(bundle, df_gallery, embs[0], enrol, image_key, batch_size, num_workers, progress, tta)
    queries = embs[1]
    if query_expansion:
        queries = expand_queries(queries, gallery.flatten(0, -2), k=query_expansion, alpha=qe_alpha)
    rescore = None
    if k_reciprocal is not None:
        warn_if_degenerate(labels[0])
        rescore = KReciprocalGallery(gallery, k_reciprocal).rerank_scores
    ks = tuple(k for k in (1, 5, 10) if k <= len(set(labels[0].tolist()))) or (1,)
    summary = summary_metrics(queries, labels[1], gallery, labels[0], metric="cosine", ks=ks,
                              threshold=None if rescore is not None else threshold, calibrate=False, rerank=rescore)
    metrics: dict[str, Any] = {"num_gallery": len(df_gallery), "num_queries": len(df_query), "num_labels": len(names),
                               **summary.metrics}
    if episodes:
        support_views = None
        if augmentation is not None:
            support_views = torch.cat([gallery.reshape(len(df_gallery), -1, gallery.shape[-1]),
                                       _reference_views(bundle, df_query, image_key, batch_size, num_workers,
                                                        progress, tta)])
        metrics.update(_episodes(embs, labels, (df_gallery, df_query), episodes, n_way, k_shot, group_key, ref_seed,
                                 support_views, augmentation.scoring if augmentation is not None else "max"))
    return metrics


def calibrate_bundle(
    bundle_dir: str | os.PathLike,
    data_csv: str | os.PathLike,
    num_refs: int = 1,
    ref_seed: int = 0,
    threshold_method: str = "f1",
    target_far: float = 0.05,
    image_key: str = "image",
    label_key: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    tta: bool = True,
    enrol: bool = True,
) -> float | None:
    """Choose a bundle's open-set threshold on labelled images and write it into the bundle.

    The CSV is split per label into ``num_refs`` references and queries as in
    :func:`evaluate_bundle` (the references enrolled with the bundle's enrolment augmentation
    unless ``enrol`` is False); the threshold comes from
    :func:`recognite.eval.open_set.calibrate_threshold` with the method and default of training's
    calibration (``'f1'``; ``'far'`` with ``target_far``), and is written atomically.

    Returns:
        The threshold written (``None`` when none could be calibrated, e.g. no query has a
        negative, or when every impostor may be accepted).
    """
    num_refs = check_int(num_refs, "num_refs", minimum=1)
    bundle = load_bundle(bundle_dir, device=device)
    df_gallery, df_query = _split(data_csv, None, num_refs, ref_seed, image_key, label_key)
    names, labels, embs = _embed_split(bundle, (df_gallery, df_query), image_key, label_key, batch_size,
                                       num_workers, progress, tta)
    gallery = _gallery_side(bundle, df_gallery, embs[0], enrol, image_key, batch_size, num_workers, progress, tta)
    summary = summary_metrics(embs[1], labels[1], gallery, labels[0], metric="cosine", ks=(1,),
                              threshold_method=threshold_method, target_far=target_far)
    threshold = summary.threshold
    if threshold is not None and not math.isfinite(threshold):
        threshold = None  # -inf: every impostor may be accepted, the same as no threshold
    write_threshold(bundle_dir, threshold)
    logger.info("Calibrated threshold %s on %d queries against %d references of %s; written to %s.",
                "none" if threshold is None else f"{threshold:.4f}", len(df_query), len(df_gallery), data_csv,
                bundle_dir)
    return threshold
