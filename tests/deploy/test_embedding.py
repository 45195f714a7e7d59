"""Listing images from files, folders and CSVs; embedding them; embeddings files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from recognite.data import eval_transform
from recognite.embedding import (
    embed_images,
    list_images,
    load_embeddings,
    read_image_csv,
    read_image_folder,
    save_embeddings,
)
from recognite.model import Preprocessing

from .conftest import IMAGE_SIZE, save, solid


def test_read_image_folder_gives_labels_from_the_top_folder(refs_tree):
    images = read_image_folder(refs_tree)
    rel = [os.path.relpath(p, refs_tree) for p in images.paths]
    assert rel == ["red/r0.png", "red/r1.png", "stripes/s0.png", os.path.join("stripes", "sub", "s1.png")]
    assert images.labels == ["red", "red", "stripes", "stripes"]
    assert all(os.path.isabs(p) for p in images.paths)


def test_list_images_from_files_folders_and_csv(refs_tree, queries, tmp_path):
    csv_file = tmp_path / "refs.csv"
    csv_file.write_text(f"label,image\n007,{os.path.relpath(refs_tree / 'red' / 'r1.png', tmp_path)}\n"
                        f"NA,{refs_tree / 'stripes' / 's0.png'}\n")
    from_csv = list_images(csv_file)
    assert from_csv.paths == [str(refs_tree / "red" / "r1.png"), str(refs_tree / "stripes" / "s0.png")]
    assert from_csv.labels == ["007", "NA"]  # read as text
    mixed = list_images([queries / "noise.png", refs_tree / "stripes", csv_file])
    assert mixed.paths == [str(queries / "noise.png"), str(refs_tree / "stripes" / "s0.png"),
                           str(refs_tree / "stripes" / "sub" / "s1.png")] + from_csv.paths
    assert mixed.labels is None  # not every input has labels
    assert list_images(csv_file, label_key=None).labels is None
    assert list_images(csv_file, label_key="other").labels is None  # column absent: no labels


def test_csv_without_label_column(refs_tree, tmp_path):
    csv_file = tmp_path / "q.csv"
    csv_file.write_text(f"path\n{refs_tree / 'red' / 'r0.png'}\n")
    assert read_image_csv(csv_file, image_key="path", label_key=None).paths == [str(refs_tree / "red" / "r0.png")]
    with pytest.raises(ValueError, match=r"no column 'image' \(image_key\); its columns are \['path'\]"):
        list_images(csv_file)


def test_list_images_errors(tmp_path, refs_tree):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="neither an image"):
        list_images([refs_tree / "stripes" / "notes.txt"])
    with pytest.raises(ValueError, match="No inputs"):
        list_images([])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("image,label\nnot_there.png,a\n")
    with pytest.raises(FileNotFoundError, match="1 of 1 image files"):
        list_images(bad_csv)


def test_embed_images_matches_a_manual_forward(model, refs_tree):
    paths = read_image_folder(refs_tree).paths  # 4 images of different sizes: batches of 3 and 1
    transform = eval_transform(Preprocessing(), IMAGE_SIZE)
    model.train()
    embeddings = embed_images(model, paths, transform, batch_size=3, progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.embed(transform(Image.open(p).convert("RGB"))[None]) for p in paths])
    assert embeddings.shape == (4, 512) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    # Different images give different embeddings (the order is not scrambled).
    assert not torch.allclose(embeddings[0], embeddings[2])


def test_embed_images_errors(model, tmp_path):
    transform = eval_transform(Preprocessing(), IMAGE_SIZE)
    with pytest.raises(ValueError, match="paths is empty"):
        embed_images(model, [], transform)
    with pytest.raises(FileNotFoundError, match="1 of 2 image files do not exist"):
        embed_images(model, [save(solid(8, 9, (1, 2, 3)), tmp_path / "a.png"), tmp_path / "b.png"], transform)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Could not read the image .*broken.png"):
        embed_images(model, [tmp_path / "broken.png"], transform, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        embed_images(model, [tmp_path / "a.png"], transform, batch_size=0)


def test_embeddings_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = torch.from_numpy(rng.normal(size=(3, 7)).astype(np.float32))
    paths, labels = ["a/ü.png", "b.png", "c d.png"], ["x", "", "ÿ"]
    save_embeddings(tmp_path / "e.safetensors", embeddings, paths, labels, metadata={"bundle": "b"})
    loaded = load_embeddings(tmp_path / "e.safetensors")
    assert torch.equal(loaded.embeddings, embeddings)
    assert loaded.paths == paths and loaded.labels == labels and loaded.metadata == {"bundle": "b"}
    save_embeddings(tmp_path / "f.safetensors", embeddings, paths)
    assert load_embeddings(tmp_path / "f.safetensors").labels is None
    with pytest.raises(ValueError, match="paths has 2 entries but embeddings has 3 rows"):
        save_embeddings(tmp_path / "g.safetensors", embeddings, paths[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "f.safetensors"]
