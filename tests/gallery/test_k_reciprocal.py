"""k-reciprocal re-ranking against a plain implementation of its definition (Python sets)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from recognite.gallery.k_reciprocal import (
    KReciprocal,
    KReciprocalGallery,
    warn_if_degenerate,
)


def _nearest(sims, i, count, pool):
    """The ``count`` items of ``pool`` most similar to ``i`` (ties by index, like a stable sort)."""
    return sorted(pool, key=lambda j: (-sims[i][j], j))[:count]


def _reference(queries, gallery, k1, k2, lam, top_n):
    """The module's definition written out: per query the universe {q} + gallery, gallery items'
    neighbourhoods taken within the gallery, dense vectors over gallery + query coordinates."""
    gallery, queries = F.normalize(gallery.double(), dim=1), F.normalize(queries.double(), dim=1)
    num = gallery.shape[0]
    gsims = (gallery @ gallery.T).tolist()
    items = list(range(num))
    table = {g: _nearest(gsims, g, k1 + 1, items) for g in items}
    h = round(k1 / 2)

    def recip(g, k):  # gallery-only reciprocal set of g at k
        return {x for x in table[g][: k + 1] if g in table[x][: k + 1]}

    def vector(weights_of, members):
        w = {j: math.exp(-weights_of(j)) for j in members}
        total = sum(w.values())
        return {j: v / total for j, v in w.items()}

    def expand(base):
        out = set(base)
        for x in base:
            if x == "q":
                continue
            rx = recip(x, h)
            if len(rx & base) > 2 / 3 * len(rx):
                out |= rx
        return out

    plain = {g: vector(lambda j, g=g: 1 - gsims[g][j], expand(recip(g, k1))) for g in items}

    def mean(vectors):
        out = {}
        for v in vectors:
            for j, x in v.items():
                out[j] = out.get(j, 0.0) + x / len(vectors)
        return out

    local = {g: mean([plain[x] for x in table[g][:k2]]) for g in items}
    result = []
    for q in queries:
        s = (gallery @ q).tolist()
        near = sorted(items, key=lambda j: (-s[j], j))[:k1]
        entry = {g: (gsims[g][table[g][k1]] if num > k1 else -math.inf) for g in items}
        r = {"q"} | {g for g in near if s[g] >= entry[g]}
        members = expand(r)
        vq = vector(lambda j, s=s: 0.0 if j == "q" else 1 - s[j], members)
        vq_local = mean([vq] + [plain[x] for x in near[: k2 - 1]])
        cands = sorted(items, key=lambda j: (-s[j], j))[:top_n]
        row = [lam * s[j] for j in items]
        for c in cands:
            m = sum(min(vq_local.get(j, 0.0), local[c].get(j, 0.0)) for j in set(vq_local) | set(local[c]))
            jaccard = 1 - m / (2 - m)
            row[c] = 1 - ((1 - lam) * jaccard + lam * (1 - s[c]))
        result.append(row)
    return torch.tensor(result)


def _problem(seed, num_labels=4, per_label=3, queries=5, dim=6):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_labels, dim, generator=gen)
    gallery = centres.repeat_interleave(per_label, 0) + 0.6 * torch.randn(num_labels * per_label, dim, generator=gen)
    query = centres[torch.arange(queries) % num_labels] + 0.6 * torch.randn(queries, dim, generator=gen)
    return query, gallery


@pytest.mark.parametrize("k1, k2, lam, top_n", [(3, 2, 0.3, 100), (4, 1, 0.5, 5), (2, 3, 0.0, 12), (20, 6, 0.3, 100)])
def test_equals_the_plain_definition_in_any_chunking(k1, k2, lam, top_n):
    queries, gallery = _problem(k1 + k2)
    expected = _reference(queries, gallery, k1, k2, lam, top_n).float()
    settings = KReciprocal(k1=k1, k2=k2, lambda_value=lam, top_n=top_n)
    unit_q, unit_g = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    for chunk in (1, 50, 10**6):  # one row per block ... everything at once
        side = KReciprocalGallery(gallery, settings, chunk_size=chunk)
        got = side.rerank_scores(unit_q @ unit_g.T)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_six_item_example_by_hand():
    # Two tight pairs and two loners on a circle; k1 = 1, k2 = 1: the sets are mutual nearest pairs.
    angles = torch.tensor([0.0, 0.1, 1.5, 1.6, 3.0, 4.5])
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[math.cos(0.04), math.sin(0.04)]])
    side = KReciprocalGallery(gallery, KReciprocal(k1=1, k2=1, lambda_value=0.3, top_n=6))
    got = side.rerank_scores(query @ gallery.T)[0]
    s = (query @ gallery.T)[0].double()
    # The query's nearest (k1 = 1) is item 0; item 0's two nearest are itself and item 1, and
    # s(q, 0) >= s(0, 1): reciprocal. Items 4 and 5 have no mutual neighbour: R = themselves. R(q) = {q, 0};
    # V_q = (1, e^{s0 - 1}) / (1 + e^{s0 - 1}) over (q, 0). Item 0: R = {0, 1} (mutual pair), so
    # V_0 = (1, e^{cos 0.1 - 1}) / Z over (0, 1). The shared mass with V_q is min over item 0 only.
    w0 = math.exp(float(s[0]) - 1)
    vq0 = w0 / (1 + w0)
    e = math.exp(math.cos(0.1) - 1)
    v0 = {0: 1 / (1 + e), 1: e / (1 + e)}
    expected = []
    for g in range(6):
        if g in (0, 1):  # item 1's set is {1, 0} too: V_1 = (e, 1) / (1 + e) over (0, 1)
            vg0 = v0[0] if g == 0 else v0[1]
            m = min(vq0, vg0)
        else:
            m = 0.0  # no shared neighbours
        jaccard = 1 - m / (2 - m)
        expected.append(1 - (0.7 * jaccard + 0.3 * (1 - float(s[g]))))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    # items 0 and 1 share the query's neighbourhood and lead; the loners follow by similarity
    assert got.argsort(descending=True)[:2].tolist() == [0, 1]


def test_items_outside_the_candidates_keep_their_order_below_them():
    queries, gallery = _problem(1, num_labels=5, per_label=4, queries=3)
    unit_q, unit_g = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    raw = unit_q @ unit_g.T
    got = KReciprocalGallery(gallery, KReciprocal(k1=3, k2=2, top_n=6)).rerank_scores(raw.clone())
    for row, new in zip(raw, got):
        cands = row.topk(6).indices
        rest = torch.ones_like(row, dtype=torch.bool)
        rest[cands] = False
        assert new[cands].min() >= new[rest].max()
        torch.testing.assert_close(new[rest], 0.3 * row[rest])


def test_a_query_gets_the_same_scores_alone_or_in_a_batch():
    queries, gallery = _problem(2)
    unit_q, unit_g = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    side = KReciprocalGallery(gallery, KReciprocal(k1=4, k2=2))
    batch = side.rerank_scores(unit_q @ unit_g.T)
    for i in range(queries.shape[0]):
        torch.testing.assert_close(side.rerank_scores(unit_q[i : i + 1] @ unit_g.T)[0], batch[i])


def test_settings_and_inputs_are_checked(caplog):
    with pytest.raises(ValueError, match="k1"):
        KReciprocal(k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        KReciprocal(lambda_value=1.5)
    with pytest.raises(ValueError, match="keys"):
        KReciprocal.from_dict({"k": 3})
    assert KReciprocal.from_dict(KReciprocal(k1=5).to_dict()) == KReciprocal(k1=5)
    side = KReciprocalGallery(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        side.rerank_scores(torch.zeros(2, 5))
    with caplog.at_level(logging.WARNING, logger="recognite.gallery.k_reciprocal"):
        assert warn_if_degenerate(torch.tensor([0, 1, 2]))
        assert not warn_if_degenerate(torch.tensor([0, 0, 2]))
    assert "one reference per label" in caplog.text


def test_recognize_lists_labels_by_their_best_re_ranked_row(caplog):
    from recognite.gallery import GalleryIndex

    queries, gallery_embs = _problem(4, num_labels=4, per_label=3, queries=6)
    labels = [f"l{i // 3}" for i in range(12)]
    settings = KReciprocal(k1=3, k2=2, top_n=5)
    unit_q, unit_g = F.normalize(queries, dim=1), F.normalize(gallery_embs, dim=1)
    reranked = KReciprocalGallery(gallery_embs, settings).rerank_scores(unit_q @ unit_g.T)
    per_label = torch.stack([reranked[:, 3 * j : 3 * j + 3].amax(dim=1) for j in range(4)], dim=1)
    best_row = torch.stack([reranked[:, 3 * j : 3 * j + 3].argmax(dim=1) + 3 * j for j in range(4)], dim=1)
    gallery = GalleryIndex()
    gallery.add(gallery_embs, labels)
    threshold = 0.5
    result = gallery.recognize(queries, k=3, threshold=threshold, k_reciprocal=settings)
    for i in range(6):
        order = per_label[i].argsort(descending=True)[:3]
        assert result.labels[i] == [f"l{j}" for j in order.tolist()]
        torch.testing.assert_close(result.scores[i], per_label[i, order])
        top_row = int(best_row[i, order[0]])
        cosine = float(unit_q[i] @ unit_g[top_row])  # the open-set decision stays on the cosine scale
        assert result.predictions[i] == (result.labels[i][0] if cosine >= threshold else "unknown")
    plain = gallery.recognize(queries, k=3)
    assert plain.scores.max() <= 1.0 and not torch.equal(plain.scores, result.scores)
    one = gallery.recognize(queries[2], k=3, k_reciprocal=settings)  # a single query: the same answer
    assert one.labels[0] == result.labels[2]
    with caplog.at_level(logging.WARNING, logger="recognite.gallery.k_reciprocal"):
        single = GalleryIndex()
        single.add(gallery_embs[:4], ["a", "b", "c", "d"])
        single.recognize(queries, k_reciprocal=settings)
    assert "one reference per label" in caplog.text
    with pytest.raises(TypeError, match="KReciprocal"):
        gallery.recognize(queries, k_reciprocal={"k1": 3})
