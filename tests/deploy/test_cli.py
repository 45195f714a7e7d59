"""End-to-end runs of the deployment subcommands (bundle, gallery, recognize, embed, export)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from recognite.bundle import WEIGHTS_FILE, load_bundle
from recognite.cli.main import main
from recognite.embedding import embed_images, load_embeddings, read_image_folder
from recognite.gallery import GalleryIndex

from .conftest import make_model, save, solid, stripes


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A bundle made with `recognite bundle` from a checkpoint laid out like recognite train's best.pt."""
    from recognite.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("run")
    model = make_model(seed=0, num_classes=3)
    save_checkpoint({
        "model": model.state_dict(), "model_config": model.config(),
        "config": {"model_name": "resnet18", "image_size": 32, "metric": "cosine"},
        "label_names": ["a", "b", "c"], "threshold": 0.5, "epoch": 2,
        "history": [{"epoch": 1, "threshold": 0.3}, {"epoch": 2, "threshold": 0.5}],
    }, root / "best.pt")
    assert main(["bundle", "--checkpoint", str(root / "best.pt"), "--output", str(root / "bundle")]) == 0
    return root / "bundle"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, argv, command, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"recognite {command}: error: ")
    assert match in lines[0], lines[0]


def test_bundle_command_keeps_model_threshold_and_labels(bundle_dir):
    bundle = load_bundle(bundle_dir, device="cpu")
    model = make_model(seed=0, num_classes=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(bundle.model.embed(x), model.embed(x))
    assert (bundle.threshold, bundle.label_names, bundle.image_size) == (0.5, ["a", "b", "c"], 32)


def test_gallery_build_and_recognize_with_unknown(bundle_dir, refs_tree, queries, tmp_path, capsys):
    gallery_file = tmp_path / "g.safetensors"
    code, _, _ = _run(capsys, "gallery", "build", "--bundle", bundle_dir, "--output", gallery_file, "--folder", refs_tree,
                      "--device", "cpu", "--no-progress", "--batch-size", "3")
    assert code == 0
    gallery = GalleryIndex.load(gallery_file)
    assert gallery.label_counts() == {"red": 2, "stripes": 2}
    # The stored references are the bundle's embeddings of the reference images.
    bundle = load_bundle(bundle_dir, device="cpu")
    refs = read_image_folder(refs_tree)
    expected = embed_images(bundle.model, refs.paths, bundle.transform, progress=False)
    torch.testing.assert_close(gallery.embeddings, expected, atol=1e-5, rtol=0)
    assert gallery.ids == refs.paths

    out_json = tmp_path / "out.json"
    code, _, _ = _run(capsys, "recognize", "--bundle", bundle_dir, "--gallery", gallery_file, queries,
                      "--threshold", "0.999999", "--top-k", "5", "--output", out_json, "--no-progress", "--device", "cpu")
    assert code == 0
    document = json.loads(out_json.read_text())
    assert document["threshold"] == 0.999999 and document["top_k"] == 2  # capped at the 2 labels
    results = {os.path.basename(r["path"]): r for r in document["results"]}
    same = results["same_red.png"]
    assert same["prediction"] == "red"
    assert same["score"] == pytest.approx(1.0, abs=1e-6)
    assert [e["label"] for e in same["top_k"]] == ["red", "stripes"]
    assert same["top_k"][0]["reference_id"] == str(refs_tree / "red" / "r0.png")
    noise = results["noise.png"]
    assert noise["prediction"] == "unknown"
    assert noise["score"] < 0.999999
    # The scores are the cosine similarities of the embeddings (independent computation).
    q = embed_images(bundle.model, [queries / "noise.png"], bundle.transform, progress=False)
    best = {lab: max(float(q[0] @ expected[i]) for i, l2 in enumerate(refs.labels) if l2 == lab) for lab in ("red", "stripes")}
    assert {e["label"]: e["score"] for e in noise["top_k"]} == pytest.approx(best, abs=1e-5)

    # Default threshold: the bundle's (0.5), below every score here, so nothing is unknown.
    out_csv = tmp_path / "out.csv"
    assert _run(capsys, "recognize", "--bundle", bundle_dir, "--gallery", gallery_file, queries, "--top-k", "1",
                "--output", out_csv, "--no-progress")[0] == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["path", "prediction", "score", "label_1", "score_1"]
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert by_name["noise.png"]["prediction"] == by_name["noise.png"]["label_1"] != "unknown"
    assert float(by_name["noise.png"]["score"]) == pytest.approx(noise["score"], abs=1e-5)

    # Terminal table.
    code, out, _ = _run(capsys, "recognize", "--bundle", bundle_dir, "--gallery", gallery_file,
                        queries / "same_red.png", "--threshold", "none", "--no-progress")
    assert code == 0
    assert out.splitlines()[1].split()[:3] == ["same_red.png", "red", "1.00000"]


def test_gallery_add_remove_info(bundle_dir, refs_tree, tmp_path, capsys):
    gallery_file = tmp_path / "g.safetensors"
    assert _run(capsys, "gallery", "build", "--bundle", bundle_dir, "--output", gallery_file, "--folder", refs_tree,
                "--aggregation", "mean", "--no-progress")[0] == 0
    green = save(solid(30, 50, (10, 200, 30)), tmp_path / "new" / "green.png")
    stripe = save(stripes(30, 30, 3), tmp_path / "new" / "more_stripes.png")
    (tmp_path / "new.csv").write_text("picture,name\nnew/green.png,green\nnew/more_stripes.png,stripes\n")
    assert _run(capsys, "gallery", "add", "--bundle", bundle_dir, "--gallery", gallery_file, "--csv",
                tmp_path / "new.csv", "--image-key", "picture", "--label-key", "name", "--no-progress")[0] == 0
    gallery = GalleryIndex.load(gallery_file)
    assert gallery.aggregation == "mean"
    assert gallery.label_counts() == {"red": 2, "stripes": 3, "green": 1}
    assert gallery.ids[-2:] == [str(green), str(stripe)]

    code, out, _ = _run(capsys, "gallery", "info", "--gallery", gallery_file, "--json", "--list-labels")
    info = json.loads(out)
    assert (info["num_references"], info["num_labels"], info["dim"]) == (6, 3, 512)
    assert info["label_counts"] == {"red": 2, "stripes": 3, "green": 1}

    assert _run(capsys, "gallery", "remove", "--gallery", gallery_file, "--labels", "stripes", "red")[0] == 0
    gallery = GalleryIndex.load(gallery_file)
    assert gallery.label_counts() == {"green": 1}
    code, out, _ = _run(capsys, "gallery", "info", "--gallery", gallery_file)
    assert "num_references  1" in out

    _one_line_error(capsys, ["gallery", "remove", "--gallery", gallery_file, "--labels", "gren"], "gallery",
                    "Cannot remove labels that are not in the gallery: ['gren']")


def test_embed_command(bundle_dir, refs_tree, tmp_path, capsys):
    csv_file = tmp_path / "refs.csv"
    images = read_image_folder(refs_tree)
    csv_file.write_text("image,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(images.paths, images.labels)))
    out = tmp_path / "e.safetensors"
    assert _run(capsys, "embed", "--bundle", bundle_dir, csv_file, "--output", out, "--no-progress",
                "--batch-size", "2")[0] == 0
    loaded = load_embeddings(out)
    bundle = load_bundle(bundle_dir, device="cpu")
    expected = embed_images(bundle.model, images.paths, bundle.transform, progress=False)
    torch.testing.assert_close(loaded.embeddings, expected, atol=1e-5, rtol=0)
    assert loaded.paths == images.paths and loaded.labels == images.labels
    assert loaded.metadata["weights_sha256"] == bundle.weights_sha256


def test_export_command_with_check(bundle_dir, tmp_path, capsys, caplog):
    out = tmp_path / "m.pt"
    with caplog.at_level("INFO", logger="recognite"):
        code, _, _ = _run(capsys, "export", "--bundle", bundle_dir, "--format", "torchscript", "--output", out, "--check")
    assert code == 0
    assert "Parity check passed" in caplog.text
    bundle = load_bundle(bundle_dir, device="cpu")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(out))
    with torch.no_grad():
        assert float((loaded(x) - bundle.model.embed(x)).abs().max()) <= 1e-5


def test_bad_inputs_exit_with_one_line(bundle_dir, refs_tree, queries, tmp_path, capsys):
    gallery_file = tmp_path / "g.safetensors"
    _one_line_error(capsys, ["recognize", "--bundle", bundle_dir, "--gallery", gallery_file, queries],
                    "recognize", "No gallery file")
    small = GalleryIndex()
    small.add(torch.randn(2, 512, generator=torch.Generator().manual_seed(0)), ["x", "y"])
    small.save(gallery_file)
    _one_line_error(capsys, ["recognize", "--bundle", tmp_path / "nope", "--gallery", gallery_file, queries],
                    "recognize", "Model bundle")
    _one_line_error(capsys, ["gallery", "build", "--bundle", bundle_dir, "--output", gallery_file, "--folder", refs_tree,
                             "--csv", "x.csv"], "gallery", "exactly one of --csv")
    _one_line_error(capsys, ["gallery", "build", "--bundle", bundle_dir, "--output", gallery_file,
                             "--folder", tmp_path / "missing"], "gallery", "not found")
    _one_line_error(capsys, ["recognize", "--bundle", bundle_dir, "--gallery", gallery_file, queries, "--output", "r.txt"],
                    "recognize", "--output must end in .csv or .json")
    _one_line_error(capsys, ["recognize", "--bundle", bundle_dir, "--gallery", gallery_file, queries / "missing.png"],
                    "recognize", "does not exist")
    _one_line_error(capsys, ["bundle", "--checkpoint", tmp_path / "none.pt", "--output", tmp_path / "b"], "bundle",
                    "does not exist")
    # A tampered bundle.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    weights = broken / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    _one_line_error(capsys, ["embed", "--bundle", broken, queries, "--output", tmp_path / "e.safetensors"], "embed",
                    "does not match the SHA-256")
    # A gallery made with another embedding size.
    other = GalleryIndex()
    other.add(torch.eye(3), ["x", "y", "z"])
    other.save(tmp_path / "other.safetensors")
    _one_line_error(capsys, ["recognize", "--bundle", bundle_dir, "--gallery", tmp_path / "other.safetensors", queries],
                    "recognize", "holds 3-dimensional embeddings but the bundle")
    with pytest.raises(SystemExit) as exc:
        main(["recognize", "--bundle", str(bundle_dir), "--gallery", str(gallery_file), str(queries), "--threshold", "high"])
    assert exc.value.code == 2
    assert "must be a number or 'none'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["embed"], ["gallery"], ["gallery", "build"], ["gallery", "add"],
                                     ["gallery", "remove"], ["gallery", "info"], ["recognize"], ["export"], ["bundle"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: recognite " + " ".join(command) in capsys.readouterr().out


def test_recognize_with_k_reciprocal_and_query_expansion_flags(bundle_dir, refs_tree, queries, tmp_path, capsys):
    from recognite.gallery.k_reciprocal import KReciprocal

    gallery_file = tmp_path / "g.safetensors"
    assert _run(capsys, "gallery", "build", "--bundle", bundle_dir, "--output", gallery_file, "--folder", refs_tree,
                "--device", "cpu", "--no-progress")[0] == 0
    gallery = GalleryIndex.load(gallery_file)
    bundle = load_bundle(bundle_dir, device="cpu")
    paths = sorted(str(p) for p in queries.iterdir())
    q = bundle.embed(paths)
    for flags, kwargs in ((["--k-reciprocal", "--k1", "2", "--k2", "1", "--kr-top-n", "3"],
                           {"k_reciprocal": KReciprocal(k1=2, k2=1, top_n=3)}),
                          (["--query-expansion", "1", "--qe-alpha", "1"], {"query_expansion": 1, "qe_alpha": 1.0})):
        out_json = tmp_path / "out.json"
        assert _run(capsys, "recognize", "--bundle", bundle_dir, "--gallery", gallery_file, *paths, "--threshold",
                    "none", "--output", out_json, "--no-progress", "--device", "cpu", *flags)[0] == 0
        got = {r["path"]: [(e["label"], e["score"]) for e in r["top_k"]] for r in json.loads(out_json.read_text())["results"]}
        want = gallery.recognize(q, k=5, **kwargs)
        for i, path in enumerate(paths):
            assert [label for label, _ in got[path]] == want.labels[i]
            assert [score for _, score in got[path]] == pytest.approx(want.scores[i, : len(want.labels[i])].tolist(),
                                                                       abs=1e-5)
