"""Enrolment augmentation (issue 17, lever 2): rotated views, per-view embeddings, the bundle
setting, gallery rows, and the evaluation engine / episodes scoring a reference by its best view,
each against a direct computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recognite.bundle import load_bundle, save_bundle, write_enrolment_augmentation
from recognite.eval import (
    episode_accuracy,
    evaluate_embeddings,
    evaluate_scores,
    pairwise_scores,
)
from recognite.model import Recognizer
from recognite.utils.views import EnrolmentAugmentation, ViewSpec, make_views


def test_a_rotation_by_hand():
    img = torch.zeros(1, 5, 5)
    img[0, 2, 4] = 1.0  # right of the centre
    views = make_views(img, ViewSpec(rotations=(90.0, -90.0, 180.0)))
    assert views.shape == (4, 1, 5, 5)
    assert views[1, 0, 0, 2] == 1.0 and views[1].sum() == 1.0  # counter-clockwise: to the top
    assert views[2, 0, 4, 2] == 1.0 and views[2].sum() == 1.0  # clockwise: to the bottom
    assert views[3, 0, 2, 0] == 1.0 and views[3].sum() == 1.0
    flat = make_views(torch.full((1, 6, 6), 0.3), ViewSpec(rotations=(17.0,)))[1]
    torch.testing.assert_close(flat, torch.full((1, 6, 6), 0.3))  # the border repeats the edge
    assert ViewSpec(rotations=(10.0,)).num_views == 2
    assert "rotations" not in ViewSpec(shift=0.1).to_dict()  # earlier bundles keep their bytes
    assert ViewSpec.from_dict(ViewSpec(rotations=(5.0, -5.0)).to_dict()) == ViewSpec(rotations=(5.0, -5.0))
    with pytest.raises(ValueError, match="rotations"):
        ViewSpec(rotations=(400.0,))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="at least 2 views"):
        EnrolmentAugmentation(ViewSpec())
    with pytest.raises(ValueError, match="scoring"):
        EnrolmentAugmentation(ViewSpec(hflip=True), scoring="min")
    spec = EnrolmentAugmentation(ViewSpec(rotations=(10.0,)), scoring="mean")
    assert EnrolmentAugmentation.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="keys"):
        EnrolmentAugmentation.from_dict({"views": {}})


def _gallery_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(7, 3, 5, generator=gen)  # 7 items x 3 views
    queries = torch.randn(9, 5, generator=gen)
    return queries, torch.randint(0, 3, (9,), generator=gen), views, torch.tensor([0, 1, 2, 0, 1, 2, 0])


def test_the_engine_scores_an_item_by_its_best_view():
    queries, q_labels, views, g_labels = _gallery_problem(0)
    best = torch.stack([pairwise_scores(queries, views[:, v], "cosine") for v in range(3)]).amax(dim=0)
    expected = evaluate_scores(best, g_labels, q_labels, ks=(1, 2))
    for chunk in (1, 4, None):
        got = evaluate_embeddings(queries, q_labels, views, g_labels, ks=(1, 2), chunk_size=chunk)
        assert got["accuracy"] == expected["accuracy"] and got["top_k_accuracy"] == expected["top_k_accuracy"]
        assert math.isclose(got["mAP"], expected["mAP"], rel_tol=1e-6)
        torch.testing.assert_close(got["per_query"].max_pos, expected["per_query"].max_pos)
    one_view = evaluate_embeddings(queries, q_labels, views[:, :1], g_labels)
    plain = evaluate_embeddings(queries, q_labels, views[:, 0], g_labels)
    assert one_view["mAP"] == plain["mAP"]
    with pytest.raises(ValueError, match="use_faiss"):
        evaluate_embeddings(queries, q_labels, views, g_labels, use_faiss=True)


def test_the_engine_applies_a_rerank_to_every_chunk():
    queries, q_labels, views, g_labels = _gallery_problem(1)
    gallery = views[:, 0]
    bump = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5])  # any transform of the block

    def rerank(block):
        return block.add_(bump)

    expected = evaluate_scores(pairwise_scores(queries, gallery, "cosine") + bump, g_labels, q_labels)
    for chunk in (1, 5, None):
        got = evaluate_embeddings(queries, q_labels, gallery, g_labels, chunk_size=chunk, rerank=rerank)
        assert got["accuracy"] == expected["accuracy"] and math.isclose(got["mAP"], expected["mAP"], rel_tol=1e-6)
    with pytest.raises(TypeError, match="rerank"):
        evaluate_embeddings(queries, q_labels, gallery, g_labels, rerank=3)


def test_episodes_score_a_class_by_its_best_support_view_or_the_mean():
    # class 0's support looks like the class-1 query in its second view: 'max' picks class 0
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    views = torch.stack([embeddings, embeddings], dim=1).clone()
    plain = episode_accuracy(embeddings, labels, n_way=2, num_episodes=40, seed=3)
    same = episode_accuracy(embeddings, labels, n_way=2, num_episodes=40, seed=3, support_views=views)
    assert torch.equal(plain["accuracies"], same["accuracies"])  # identical views change nothing
    # a direct computation of both scorings on random episodes
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(30, 4, generator=gen), dim=1)
    lab = torch.arange(30) % 6
    support = F.normalize(torch.randn(30, 3, 4, generator=gen), dim=2)
    for scoring in ("max", "mean"):
        got = episode_accuracy(emb, lab, n_way=3, k_shot=2, n_query=1, num_episodes=25, seed=1,
                               support_views=support, support_scoring=scoring)
        # replay the sampler: the episodes are those of the plain call with the same seed
        replay = _replay(lab, n_way=3, k_shot=2, n_query=1, num_episodes=25, seed=1)
        correct = []
        for chosen in replay:
            hits = []
            for way, (sup, qry) in enumerate(chosen):
                for q in qry:
                    scores = []
                    for other_sup, _ in chosen:
                        vecs = support[other_sup].reshape(-1, 4)
                        if scoring == "max":
                            scores.append(float((vecs @ emb[q]).max()))
                        else:
                            scores.append(float(F.normalize(vecs.mean(0), dim=0) @ emb[q]))
                    hits.append(all(scores[way] > s for i, s in enumerate(scores) if i != way))
            correct.append(sum(hits) / len(hits))
        torch.testing.assert_close(got["accuracies"], torch.tensor(correct, dtype=torch.float64))
    with pytest.raises(ValueError, match="support_views"):
        episode_accuracy(emb, lab, n_way=3, support_views=support[:5])


def _replay(labels, n_way, k_shot, n_query, num_episodes, seed):
    """The episodes ``episode_accuracy`` draws (same generator calls), as (support, query) index lists."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, return_counts=True)
    members = dict(zip(classes.tolist(), order.split(counts.tolist())))
    pool = [c for c, n in zip(classes.tolist(), counts.tolist()) if n >= k_shot + n_query]
    gen = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(num_episodes):
        torch.randint(1, (1,), generator=gen)
        chosen = torch.randperm(len(pool), generator=gen)[:n_way].tolist()
        ways = []
        for position in chosen:
            index = members[pool[position]]
            picked = index[torch.randperm(index.numel(), generator=gen)[: k_shot + n_query]]
            ways.append((picked[:k_shot].tolist(), picked[k_shot:].tolist()))
        episodes.append(ways)
    return episodes


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_bundle(Recognizer("resnet18").eval(), tmp_path_factory.mktemp("b") / "b", image_size=32)


def _images(folder, count):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_bundle_enrols_each_reference_as_its_views(bundle_dir, tmp_path):
    digest_before = json.loads((bundle_dir / "bundle.json").read_text())["config_sha256"]
    paths = _images(tmp_path, 3)
    spec = EnrolmentAugmentation(ViewSpec(rotations=(-10.0, 10.0)), scoring="max")
    write_enrolment_augmentation(bundle_dir, spec)
    try:
        bundle = load_bundle(bundle_dir)  # the recomputed config_sha256 holds
        assert bundle.enrolment_augmentation == spec
        rows = bundle.embed_references(paths)
        assert rows.shape == (3, 3, bundle.embedding_dim)
        from recognite.data.images import read_image

        views = make_views(bundle.transform(read_image(paths[1])), spec.views)
        with torch.no_grad():
            torch.testing.assert_close(rows[1], bundle.model.embed(views), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bundle.embed_references(paths, enrol=False)[:, 0], bundle.embed(paths))
        assert torch.equal(rows[:, 0], bundle.embed_references(paths)[:, 0])

        from recognite.deploy import build_gallery
        from recognite.embedding import ImageList

        refs = ImageList(paths=paths, labels=["a", "b", "a"], sources=[])
        gallery, _ = build_gallery(bundle, refs, tmp_path / "g.safetensors", device="cpu")
        assert len(gallery) == 9 and gallery.reference_labels == ["a"] * 3 + ["b"] * 3 + ["a"] * 3
        assert gallery.ids == [p for p in paths for _ in range(3)]
        torch.testing.assert_close(gallery.embeddings, F.normalize(rows.flatten(0, 1), dim=1))
        plain, _ = build_gallery(bundle, refs, tmp_path / "p.safetensors", device="cpu", enrol=False)
        assert len(plain) == 3

        write_enrolment_augmentation(bundle_dir, EnrolmentAugmentation(spec.views, scoring="mean"))
        mean = load_bundle(bundle_dir).embed_references(paths)
        torch.testing.assert_close(mean[:, 0], F.normalize(rows.mean(1), dim=1), atol=1e-5, rtol=1e-5)
    finally:
        write_enrolment_augmentation(bundle_dir, None)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert "enrolment_augmentation" not in manifest and manifest["config_sha256"] == digest_before


def test_evaluate_follows_the_bundle_and_can_switch_it_off(bundle_dir, tmp_path):
    import pandas as pd

    from recognite.evaluate import evaluate_bundle

    paths = _images(tmp_path, 8)
    csv = tmp_path / "data.csv"
    pd.DataFrame({"image": paths, "label": [f"l{i % 4}" for i in range(8)]}).to_csv(csv, index=False)
    spec = EnrolmentAugmentation(ViewSpec(rotations=(-15.0, 15.0)), scoring="max")
    write_enrolment_augmentation(bundle_dir, spec)
    try:
        bundle = load_bundle(bundle_dir, device="cpu")
        got = evaluate_bundle(bundle, csv, threshold=None, episodes=5, n_way=2)
        off = evaluate_bundle(bundle, csv, threshold=None, episodes=5, n_way=2, enrol=False)
    finally:
        write_enrolment_augmentation(bundle_dir, None)
    from recognite.data import split_gallery_query

    df = pd.read_csv(csv)
    df_g, df_q = split_gallery_query(df, num_refs=1, seed=0)
    views = bundle.embed_references(list(df_g["image"]))
    queries = bundle.embed(list(df_q["image"]))
    names = sorted(set(df["label"]))
    gl = torch.tensor([names.index(x) for x in df_g["label"]])
    ql = torch.tensor([names.index(x) for x in df_q["label"]])
    expected = evaluate_embeddings(queries, ql, views, gl, ks=(1,))
    assert got["top1"] == expected["accuracy"] and math.isclose(got["mAP"], expected["mAP"], rel_tol=1e-6)
    plain = evaluate_embeddings(queries, ql, bundle.embed(list(df_g["image"])), gl, ks=(1,))
    assert off["top1"] == plain["accuracy"] and math.isclose(off["mAP"], plain["mAP"], rel_tol=1e-6)


def test_mirrored_views_are_refused_for_a_model_trained_without_flips(tmp_path):
    from recognite.bundle import write_test_time_augmentation

    torch.manual_seed(0)
    model = Recognizer("resnet18").eval()
    no_flips = save_bundle(model, tmp_path / "a", image_size=32, metadata={"train_config": {"hflip": 0.0}})
    with pytest.raises(ValueError, match="trained without horizontal flips"):
        write_test_time_augmentation(no_flips, ViewSpec(hflip=True))
    with pytest.raises(ValueError, match="trained without horizontal flips"):
        write_enrolment_augmentation(no_flips, EnrolmentAugmentation(ViewSpec(hflip=True)))
    assert "test_time_augmentation" not in json.loads((no_flips / "bundle.json").read_text())  # nothing written
    write_test_time_augmentation(no_flips, ViewSpec(shift=0.1))  # other views are fine
    flips = save_bundle(model, tmp_path / "b", image_size=32, metadata={"train_config": {"hflip": 0.5}})
    write_enrolment_augmentation(flips, EnrolmentAugmentation(ViewSpec(hflip=True)))
    assert load_bundle(flips).enrolment_augmentation.views.hflip
