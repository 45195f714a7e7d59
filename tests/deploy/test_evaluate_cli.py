"""`recognite evaluate`: metrics of a bundle on a CSV, checked against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from recognite.bundle import load_bundle, save_bundle
from recognite.cli import main
from recognite.data import load_csv, split_gallery_query

from .conftest import IMAGE_SIZE, make_model, save, solid, stripes


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(3)
    rows = ["image,label"]
    bases = {"red": solid(36, 40, (220, 30, 20)), "blue": solid(36, 40, (20, 40, 210)),
             "stripes": stripes(36, 40, 3), "wide": stripes(36, 40, 7)}
    for label, base in bases.items():
        for i in range(3):
            noisy = np.clip(base.astype(int) + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8)
            save(noisy, root / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


def test_evaluate_matches_an_independent_computation(tmp_path, labelled_csv):
    bundle_dir = save_bundle(make_model(), tmp_path / "bundle", image_size=IMAGE_SIZE, threshold=0.5)
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--num-refs", "1",
                 "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    metrics = json.loads(out.read_text())

    bundle = load_bundle(bundle_dir, device="cpu")
    df_gallery, df_query = split_gallery_query(load_csv(labelled_csv), num_refs=1, seed=0)
    gallery = bundle.embed(list(df_gallery["image"])).double().numpy()
    query = bundle.embed(list(df_query["image"])).double().numpy()
    scores = query @ gallery.T / np.linalg.norm(query, axis=1)[:, None] / np.linalg.norm(gallery, axis=1)[None, :]
    same = df_query["label"].to_numpy()[:, None] == df_gallery["label"].to_numpy()[None, :]
    top1 = np.mean([same[i, np.argmax(scores[i])] for i in range(len(query))])
    ap = np.mean([average_precision_score(same[i], scores[i]) for i in range(len(query))])
    assert metrics["num_queries"] == 8 and metrics["num_gallery"] == 4
    assert metrics["top1"] == pytest.approx(top1)
    assert metrics["mAP"] == pytest.approx(ap)
    best_neg = np.where(same, -np.inf, scores).max(axis=1)
    assert metrics["FAR"] == pytest.approx(np.mean(best_neg >= 0.5))


def test_evaluate_bad_input_is_one_line(tmp_path, labelled_csv, capsys):
    bundle_dir = save_bundle(make_model(), tmp_path / "bundle", image_size=IMAGE_SIZE)
    capsys.readouterr()  # the library's own log lines (an earlier CLI call may have set up logging)
    code = main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(tmp_path / "missing.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.csv" in err[0]
    code = main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--num-refs", "0"])
    assert code == 2 and "--num-refs" in capsys.readouterr().err


def test_evaluate_with_k_reciprocal_equals_the_engine_on_re_ranked_scores(tmp_path, labelled_csv):
    import torch

    from recognite.eval import evaluate_embeddings
    from recognite.gallery.k_reciprocal import KReciprocal, KReciprocalGallery

    bundle_dir = save_bundle(make_model(), tmp_path / "bundle", image_size=IMAGE_SIZE, threshold=0.5)
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--num-refs", "2",
                 "--k-reciprocal", "--k1", "3", "--k2", "2", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert "FAR" not in metrics  # the threshold is a cosine similarity: no rates on re-ranked scores
    bundle = load_bundle(bundle_dir, device="cpu")
    df_gallery, df_query = split_gallery_query(load_csv(labelled_csv), num_refs=2, seed=0)
    gallery, queries = bundle.embed(list(df_gallery["image"])), bundle.embed(list(df_query["image"]))
    names = sorted(set(df_gallery["label"]))
    gl = torch.tensor([names.index(x) for x in df_gallery["label"]])
    ql = torch.tensor([names.index(x) for x in df_query["label"]])
    side = KReciprocalGallery(gallery, KReciprocal(k1=3, k2=2))
    expected = evaluate_embeddings(queries, ql, gallery, gl, ks=(1,), rerank=side.rerank_scores)
    assert metrics["top1"] == pytest.approx(expected["accuracy"])
    assert metrics["mAP"] == pytest.approx(expected["mAP"])


def test_calibrate_sets_the_enrolment_views_and_evaluate_can_switch_them_off(tmp_path, labelled_csv, capsys):
    bundle_dir = save_bundle(make_model(), tmp_path / "bundle", image_size=IMAGE_SIZE)
    code = main(["calibrate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--enrol-rotations",
                 "-10", "10", "--no-progress", "--device", "cpu"])
    assert code == 0
    assert "3 per reference, scored by max" in capsys.readouterr().out
    bundle = load_bundle(bundle_dir, device="cpu")
    assert bundle.enrolment_augmentation.views.rotations == (-10.0, 10.0)
    with pytest.raises(ValueError, match="multi-view enrolment"):
        _evaluate(bundle, labelled_csv)
    on, off = tmp_path / "on.json", tmp_path / "off.json"
    for path, flag in ((on, "--enrol-aug"), (off, "--no-enrol-aug")):
        assert main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), flag, "--output",
                     str(path), "--no-progress", "--device", "cpu"]) == 0
    from recognite.evaluate import evaluate_bundle

    assert json.loads(on.read_text())["mAP"] == pytest.approx(evaluate_bundle(bundle, labelled_csv)["mAP"])
    assert json.loads(off.read_text())["mAP"] == pytest.approx(evaluate_bundle(bundle, labelled_csv, enrol=False)["mAP"])
    assert main(["calibrate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--enrol-rotations",
                 "--no-progress", "--device", "cpu"]) == 0
    assert load_bundle(bundle_dir, device="cpu").enrolment_augmentation is None  # no views left: off


def _evaluate(bundle, csv):
    from recognite.evaluate import evaluate_bundle
    from recognite.gallery.k_reciprocal import KReciprocal

    return evaluate_bundle(bundle, csv, k_reciprocal=KReciprocal())


def test_a_bundle_stores_its_re_ranking_and_calls_follow_or_switch_it_off(tmp_path, labelled_csv, capsys):
    from recognite.evaluate import evaluate_bundle
    from recognite.gallery.k_reciprocal import KReciprocal
    from recognite.utils.reranking import Reranking

    bundle_dir = save_bundle(make_model(), tmp_path / "bundle", image_size=IMAGE_SIZE)
    digest = json.loads((bundle_dir / "bundle.json").read_text())["config_sha256"]
    assert main(["calibrate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--store-reranking",
                 "--k-reciprocal", "--k1", "3", "--k2", "2", "--no-progress", "--device", "cpu"]) == 0
    bundle = load_bundle(bundle_dir, device="cpu")  # the recomputed config_sha256 holds
    assert bundle.reranking == Reranking(k_reciprocal=KReciprocal(k1=3, k2=2))
    stored = evaluate_bundle(bundle, labelled_csv, num_refs=2)
    explicit = evaluate_bundle(bundle, labelled_csv, num_refs=2, k_reciprocal=KReciprocal(k1=3, k2=2), rerank=False)
    plain = evaluate_bundle(bundle, labelled_csv, num_refs=2, rerank=False)
    assert stored["mAP"] == explicit["mAP"] and "FAR" not in stored
    qe = evaluate_bundle(bundle, labelled_csv, num_refs=2, query_expansion=1)  # the call's own replaces the bundle's
    assert qe["mAP"] == evaluate_bundle(bundle, labelled_csv, num_refs=2, query_expansion=1, rerank=False)["mAP"]
    out = tmp_path / "off.json"
    assert main(["evaluate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--num-refs", "2",
                 "--no-rerank", "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["mAP"] == pytest.approx(plain["mAP"])
    assert main(["calibrate", "--bundle", str(bundle_dir), "--data-csv", str(labelled_csv), "--store-reranking",
                 "--no-progress", "--device", "cpu"]) == 0
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert "reranking" not in manifest and manifest["config_sha256"] == digest
    with pytest.raises(ValueError, match="keys"):
        Reranking.from_dict({"qe": 1})
