"""Editing the gallery (add, remove), info, and clear errors on bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from recognite.gallery import GalleryIndex


def _refs(seed=0, n=9, dim=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen) * torch.linspace(0.2, 5.0, n).unsqueeze(1)


def test_add_normalizes_and_codes_labels():
    refs = _refs()
    gallery = GalleryIndex()
    labels = ["b", "a", "b", "c", 7, "a", np.int64(7), "d", "b"]
    gallery.add(refs, labels, ids=[f"p{i}" for i in range(9)])
    assert gallery.labels == ["b", "a", "c", "7", "d"]
    assert gallery.label_codes.tolist() == [0, 1, 0, 2, 3, 1, 3, 4, 0]
    assert gallery.reference_labels == ["b", "a", "b", "c", "7", "a", "7", "d", "b"]
    expected = refs / refs.norm(dim=1, keepdim=True)
    torch.testing.assert_close(gallery.embeddings, expected)
    assert gallery.label_counts() == {"b": 3, "a": 2, "c": 1, "7": 2, "d": 1}
    assert len(gallery) == 9 and "a" in gallery and "z" not in gallery
    assert gallery.info() == {
        "num_references": 9, "num_labels": 5, "dim": 5, "aggregation": "all",
        "backend": "torch", "has_ids": True, "device": "cpu",
    }


def test_ids_missing_in_one_batch_become_empty():
    gallery = GalleryIndex()
    gallery.add(_refs(n=2), ["a", "b"])
    gallery.add(_refs(1, n=2), ["c", "a"], ids=["x.jpg", "y.jpg"])
    gallery.add(_refs(2, n=1), ["d"])
    assert gallery.ids == ["", "", "x.jpg", "y.jpg", ""]


def test_remove_equals_gallery_built_without_those_labels():
    refs = _refs(n=9)
    labels = ["b", "a", "b", "c", "e", "a", "e", "d", "b"]
    ids = [f"p{i}" for i in range(9)]
    gallery = GalleryIndex()
    gallery.add(refs, labels, ids=ids)
    assert gallery.remove(["a", "c"]) == 3
    keep = [i for i, lab in enumerate(labels) if lab not in ("a", "c")]
    fresh = GalleryIndex()
    fresh.add(refs[keep], [labels[i] for i in keep], ids=[ids[i] for i in keep])
    assert gallery.labels == fresh.labels == ["b", "e", "d"]
    assert torch.equal(gallery.label_codes, fresh.label_codes)
    assert torch.equal(gallery.embeddings, fresh.embeddings)
    assert gallery.ids == fresh.ids
    queries = _refs(5, n=4)
    a, b = gallery.search(queries, k=3), fresh.search(queries, k=3)
    assert a.labels == b.labels and torch.equal(a.scores, b.scores)
    assert gallery.remove("e") == 2  # a single label as a string
    assert gallery.labels == ["b", "d"]
    gallery.add(refs[:1], ["a"])  # a removed label can come back, with a new code
    assert gallery.labels == ["b", "d", "a"] and gallery.label_codes.tolist() == [0, 0, 1, 0, 2]


def test_remove_updates_mean_prototypes():
    gallery = GalleryIndex(aggregation="mean")
    gallery.add(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), ["a", "b", "c"])
    before = gallery.search(torch.tensor([[1.0, 0.1]]), k=3).labels
    gallery.remove(["a"])
    assert before == [["a", "c", "b"]]
    assert gallery.search(torch.tensor([[1.0, 0.1]]), k=3).labels == [["c", "b"]]


def test_remove_unknown_label_names_it():
    gallery = GalleryIndex()
    gallery.add(_refs(n=3), ["apple", "pear", "plum"])
    with pytest.raises(ValueError, match=r"'aple'.*'kiwi'|'kiwi'.*'aple'") as err:
        gallery.remove(["pear", "aple", "kiwi"])
    assert "apple" in str(err.value)  # close match suggested
    assert gallery.labels == ["apple", "pear", "plum"]  # nothing removed


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda g: g.add(torch.ones(2, 4), ["a", "b"]), ValueError, r"dimension 4.*5-dimensional"),
        (lambda g: g.search(torch.ones(2, 3)), ValueError, r"dimension 3.*5-dimensional"),
        (lambda g: g.search(torch.ones(2, 5), k=0), ValueError, r"k must be a positive integer, got 0"),
        (lambda g: g.search(torch.ones(2, 5), k=-2), ValueError, r"k must be a positive integer, got -2"),
        (lambda g: g.search(torch.ones(2, 5), k=1.5), ValueError, r"k must be a positive integer, got 1.5"),
        (lambda g: g.search(torch.ones(2, 5), chunk_size=0), ValueError, r"chunk_size"),
        (lambda g: g.add(torch.tensor([[1.0, float("nan"), 0, 0, 0]]), ["a"]), ValueError, r"NaN or infinite.*\[0\]"),
        (lambda g: g.search(torch.tensor([[1.0, 0, 0, 0, float("inf")]])), ValueError, r"query_embeddings contain NaN or infinite"),
        (lambda g: g.add(torch.zeros(1, 5), ["a"]), ValueError, r"all-zero rows \[0\]"),
        (lambda g: g.add(torch.ones(2, 5), ["a"]), ValueError, r"labels has 1 entries but there are 2"),
        (lambda g: g.add(torch.ones(1, 5), ["unknown"]), ValueError, r"'unknown'.*reserved"),
        (lambda g: g.add(torch.ones(1, 5), [""]), ValueError, r"reserved"),
        (lambda g: g.add(torch.ones(1, 5), "a"), TypeError, r"sequence of 1 strings"),
        (lambda g: g.add(torch.ones(1, 5), [1.5]), TypeError, r"labels\[0\] must be a string"),
        (lambda g: g.add(torch.ones(1, 5), ["a"], ids=["x", "y"]), ValueError, r"ids has 2 entries"),
        (lambda g: g.add(torch.ones(5), ["a"]), ValueError, r"shape \(N, D\), got shape \(5,\)"),
        (lambda g: g.add("abc", ["a"]), TypeError, r"real numbers|tensor or array"),
    ],
)
def test_bad_input_gives_clear_error(call, error, pattern):
    gallery = GalleryIndex(dim=5)
    gallery.add(torch.eye(5)[:2], ["x", "y"])
    with pytest.raises(error, match=pattern):
        call(gallery)
    assert len(gallery) == 2  # a failed call changes nothing


def test_bad_construction_and_empty_gallery():
    with pytest.raises(ValueError, match=r"aggregation must be one of 'all', 'mean', got 'avg'"):
        GalleryIndex(aggregation="avg")
    with pytest.raises(ValueError, match=r"backend must be one of .*'faiss-flot'.*Did you mean: faiss-flat"):
        GalleryIndex(backend="faiss-flot")
    with pytest.raises(ValueError, match=r"dim must be a positive integer or None, got 0"):
        GalleryIndex(dim=0)
    with pytest.raises(ValueError, match=r"nprobe must be a positive integer, got 0"):
        GalleryIndex(nprobe=0)
    with pytest.raises(ValueError, match=r"gallery is empty"):
        GalleryIndex().search(torch.ones(1, 3))


def test_faiss_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"faiss-cpu.*pip install 'recognite\[faiss\]'"):
        GalleryIndex(backend="faiss-flat")
    gallery = GalleryIndex()
    with pytest.raises(ImportError, match=r"recognite\[faiss\]"):
        gallery.set_backend("faiss-ivf")
    assert gallery.backend == "torch"
