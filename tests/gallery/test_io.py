"""Saving and loading: round trip, atomic writes, refusal of tampered or truncated files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recognite.gallery import GalleryIndex, _io


def _gallery(aggregation="all", ids=True):
    gen = torch.Generator().manual_seed(4)
    refs = torch.randn(11, 6, generator=gen) * torch.linspace(0.3, 4.0, 11).unsqueeze(1)
    labels = ["é-label", "b", "b", "c", "b", "d", "c", "标签", "e", "e", "b"]
    gallery = GalleryIndex(aggregation=aggregation, nprobe=3)
    gallery.add(refs, labels, ids=[f"dir/img {i}.jpg" for i in range(11)] if ids else None)
    gallery.remove(["d"])
    return gallery


@pytest.mark.parametrize("aggregation", ["all", "mean"])
@pytest.mark.parametrize("ids", [True, False])
def test_round_trip_is_identical(tmp_path, aggregation, ids):
    gallery = _gallery(aggregation, ids)
    written = gallery.save(tmp_path / "g.safetensors")
    loaded = GalleryIndex.load(written)
    assert torch.equal(loaded.embeddings, gallery.embeddings)
    assert torch.equal(loaded.label_codes, gallery.label_codes)
    assert loaded.labels == gallery.labels
    assert loaded.ids == gallery.ids
    assert loaded.info() == gallery.info()
    queries = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    a, b = gallery.search(queries, k=3), loaded.search(queries, k=3)
    assert a.labels == b.labels and torch.equal(a.scores, b.scores)
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors"]  # no temporary file left


def test_folder_path_and_empty_gallery(tmp_path):
    written = GalleryIndex(aggregation="mean").save(tmp_path)
    assert written == str(tmp_path / "gallery.safetensors")
    loaded = GalleryIndex.load(tmp_path)
    assert len(loaded) == 0 and loaded.dim is None and loaded.aggregation == "mean"
    loaded.add(torch.ones(1, 3), ["a"])
    assert loaded.dim == 3


def test_overwrite_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        GalleryIndex().save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors"]


def _rewrite(path, edit_tensors=None, edit_meta=None):
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()[_io.METADATA_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata={_io.METADATA_KEY: json.dumps(meta)})


def test_metadata_shape_mismatch_is_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)
    _rewrite(path, edit_meta=lambda m: m.update(num_references=m["num_references"] + 1))
    with pytest.raises(ValueError, match=r"metadata says 11 references of dimension 6, but the embeddings have shape \(10, 6\)"):
        GalleryIndex.load(path)


def test_dimension_mismatch_is_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)
    _rewrite(path, edit_meta=lambda m: m.update(dim=5))
    with pytest.raises(ValueError, match=r"dimension 5, but the embeddings have shape \(10, 6\)"):
        GalleryIndex.load(path)


def test_modified_embeddings_are_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)

    def bump(tensors):
        tensors["embeddings"][2, 1] += 0.5

    _rewrite(path, edit_tensors=bump)
    with pytest.raises(ValueError, match=r"modified after it was written.*'embeddings'"):
        GalleryIndex.load(path)
    # without the checksum the normalization check still notices
    with pytest.raises(ValueError, match=r"not L2-normalized"):
        GalleryIndex.load(path, verify=False)


def test_label_codes_out_of_range_are_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)

    def bad_codes(tensors):
        tensors["label_codes"][0] = 99

    _rewrite(path, edit_tensors=bad_codes)
    with pytest.raises(ValueError, match=r"label codes must cover 0\.\.4"):
        GalleryIndex.load(path, verify=False)


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "g.safetensors"
    _gallery().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ValueError, match=r"cannot be read \(truncated or not a safetensors file\)"):
        GalleryIndex.load(path)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No gallery file"):
        GalleryIndex.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a recognite gallery"):
        GalleryIndex.load(plain)
    path = tmp_path / "g.safetensors"
    _gallery().save(path)
    _rewrite(path, edit_meta=lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99"):
        GalleryIndex.load(path)
