"""Every path that reports recognition figures agrees: training, the report, ``evaluate`` and the
open-set functions, on one validation split and on a gallery that lacks some query labels."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from recognite.bundle import load_bundle
from recognite.data import train_val_datasets
from recognite.eval import (
    evaluate_embeddings,
    open_set_metrics,
    open_set_rates,
    pairwise_scores,
    summary_metrics,
)
from recognite.evaluate import evaluate_bundle
from recognite.report import compute_report_data
from recognite.report._data import open_set_rates as report_open_set_rates
from recognite.train import train

from .train.conftest import tiny_config, write_tiny_dataset

FIGURES = ("top1", "mAP", "DIR", "FAR", "threshold")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    csv_file = write_tiny_dataset(root / "data", num_labels=12, per_label=4)
    config = tiny_config(csv_file, root / "run", report=True, epochs=2)
    result = train(config)
    return root, csv_file, config, result


def _split_csvs(root, csv_file, config):
    _, ds_gallery, ds_query = train_val_datasets(csv_file, num_folds=config.num_folds, val_fold=int(config.val_fold),
                                                 fold_seed=config.fold_seed, num_refs=config.num_refs,
                                                 ref_seed=config.ref_seed)
    paths = {}
    for name, ds in (("gallery", ds_gallery), ("query", ds_query)):
        path = root / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"])
            for image, label in zip(ds.df["image"], ds.df["label"]):
                writer.writerow([str(csv_file.parent / image), label])
        paths[name] = path
    return paths


def test_metrics_csv_report_and_evaluate_agree(run):
    root, csv_file, config, result = run
    rows = list(csv.DictReader((root / "run" / "metrics.csv").open()))
    best = next(r for r in rows if int(r["epoch"]) == result.best["epoch"])
    summary = json.loads((root / "run" / "report" / "summary.json").read_text())
    bundle = load_bundle(root / "run" / "bundle", device="cpu")
    # The threshold the run calibrated is the bundle's (cosine metric: no conversion).
    assert bundle.threshold == pytest.approx(float(best["threshold"]), abs=1e-7)
    assert summary["threshold"] == pytest.approx(float(best["threshold"]), abs=1e-7)
    paths = _split_csvs(root, csv_file, config)
    evaluated = evaluate_bundle(bundle, paths["query"], gallery_csv=paths["gallery"])
    for key in ("top1", "mAP", "DIR", "FAR"):
        expected = float(best[key])
        assert summary["metrics"][key] == pytest.approx(expected, abs=1e-6), key
        assert summary["open_set_at_threshold"].get(key, expected) == pytest.approx(expected, abs=1e-6), key
        assert evaluated[key] == pytest.approx(expected, abs=1e-6), key
    assert evaluated["threshold"] == pytest.approx(float(best["threshold"]), abs=1e-7)


def test_a_gallery_missing_some_query_labels_gives_one_set_of_open_set_rates():
    generator = torch.Generator().manual_seed(3)
    gallery = torch.nn.functional.normalize(torch.randn(9, 6, generator=generator), dim=1)
    gallery_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4])
    queries = torch.nn.functional.normalize(
        gallery[[0, 2, 4, 6, 7, 1]] + 0.6 * torch.randn(6, 6, generator=generator), dim=1)
    queries = torch.cat([queries, torch.nn.functional.normalize(torch.randn(4, 6, generator=generator), dim=1)])
    query_labels = torch.tensor([0, 1, 2, 3, 4, 0, 7, 8, 7, 9])  # 7, 8, 9: not enrolled
    threshold = 0.3

    # By hand: best positive and best negative of each query from the full score matrix.
    scores = pairwise_scores(queries, gallery, "cosine").double()
    same = query_labels[:, None] == gallery_labels[None, :]
    max_pos = scores.masked_fill(~same, -math.inf).max(dim=1).values
    max_neg = scores.masked_fill(same, -math.inf).max(dim=1).values
    genuine = same.any(dim=1)
    accepted = torch.maximum(max_pos, max_neg) >= threshold
    expected_dir = float((accepted & genuine & (max_pos > max_neg)).sum() / genuine.sum())
    expected_far = float((max_neg >= threshold).double().mean())  # every query has a negative here

    paths = {
        "open_set_rates": open_set_rates(
            evaluate_embeddings(queries, query_labels, gallery, gallery_labels)["per_query"].max_pos,
            evaluate_embeddings(queries, query_labels, gallery, gallery_labels)["per_query"].max_neg, threshold),
        "summary_metrics": summary_metrics(queries, query_labels, gallery, gallery_labels, threshold=threshold).metrics,
        "open_set_metrics": open_set_metrics(scores.float(), gallery_labels, query_labels, threshold,
                                             withhold_known=True),
        "report": report_open_set_rates(compute_report_data(queries, query_labels, gallery, gallery_labels), threshold),
    }
    assert 0.0 < expected_dir < 1.0 and 0.0 < expected_far < 1.0  # a case where the rates can be wrong
    for name, rates in paths.items():
        assert rates["DIR"] == pytest.approx(expected_dir, abs=1e-12), name
        assert rates["FAR"] == pytest.approx(expected_far, abs=1e-12), name


def test_evaluate_bundle_with_a_separate_gallery_uses_the_same_convention(run, tmp_path):
    root, csv_file, config, _ = run
    paths = _split_csvs(root, csv_file, config)
    gallery_rows = list(csv.reader(paths["gallery"].open()))
    dropped = gallery_rows[1][1]
    partial = tmp_path / "partial_gallery.csv"
    with partial.open("w", newline="") as f:
        csv.writer(f).writerows([gallery_rows[0]] + [r for r in gallery_rows[1:] if r[1] != dropped])
    bundle = load_bundle(root / "run" / "bundle", device="cpu")
    evaluated = evaluate_bundle(bundle, paths["query"], gallery_csv=partial, threshold=0.5)
    query_embs = bundle.embed([r[0] for r in list(csv.reader(paths["query"].open()))[1:]])
    gallery_embs = bundle.embed([r[0] for r in list(csv.reader(partial.open()))[1:]])
    names = sorted({r[1] for r in list(csv.reader(paths["query"].open()))[1:]})
    to_int = {n: i for i, n in enumerate(names)}
    query_labels = torch.tensor([to_int[r[1]] for r in list(csv.reader(paths["query"].open()))[1:]])
    gallery_labels = torch.tensor([to_int[r[1]] for r in list(csv.reader(partial.open()))[1:]])
    scores = pairwise_scores(query_embs, gallery_embs, "cosine")
    direct = open_set_metrics(scores, gallery_labels, query_labels, 0.5, withhold_known=True)
    assert int((query_labels == to_int[dropped]).sum()) > 0  # some queries have no enrolled label
    assert evaluated["DIR"] == pytest.approx(direct["DIR"], abs=1e-9)
    assert evaluated["FAR"] == pytest.approx(direct["FAR"], abs=1e-9)
