"""The embedding neck, bundles without training, and ``recognite calibrate``."""

from __future__ import annotations

import json

import pytest
import torch

from recognite.bundle import load_bundle
from recognite.cli.main import main
from recognite.data import load_csv, split_gallery_query
from recognite.eval import summary_metrics
from recognite.gallery import GalleryIndex
from recognite.model import Recognizer

from ..train.conftest import tiny_config, write_tiny_dataset


def test_neck_width_is_the_embedding_width_in_every_output():
    torch.manual_seed(0)
    model = Recognizer("resnet18", num_classes=4, embedding_dim=16)
    images = torch.randn(3, 3, 32, 32)
    model.train()
    assert model(images).shape == (3, 4)
    model.eval()
    with torch.no_grad():
        embeddings = model(images)
    assert embeddings.shape == (3, 16) and torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    # By hand: backbone features, projection, batch norm (running statistics in eval mode), normalize.
    with torch.no_grad():
        features = model.backbone(images)
        projected = features @ model.neck[0].weight.T
        bn = model.neck[1]
        expected = (projected - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(embeddings, torch.nn.functional.normalize(expected, dim=1), atol=1e-5)
    assert model.config()["neck_dim"] == 16 and Recognizer.from_config(model.config()).embedding_dim == 16
    assert Recognizer("resnet18").config()["neck_dim"] is None


@pytest.fixture(scope="module")
def neck_run(tmp_path_factory):
    from recognite.train import train

    root = tmp_path_factory.mktemp("neck")
    csv_file = write_tiny_dataset(root / "data")
    train(tiny_config(csv_file, root / "run", embedding_dim=16, epochs=1))
    return root, csv_file


def test_a_neck_run_gives_a_narrow_bundle_gallery_and_export(neck_run, tmp_path):
    root, csv_file = neck_run
    bundle = load_bundle(root / "run" / "bundle", device="cpu")
    assert bundle.embedding_dim == 16 and bundle.model.neck is not None
    images = [str(csv_file.parent / p) for p in load_csv(csv_file)["image"][:6]]
    assert main(["gallery", "build", "--bundle", str(root / "run" / "bundle"), "--folder",
                 str(csv_file.parent / "images"), "--output", str(tmp_path / "g.safetensors"), "--no-progress"]) == 0
    assert GalleryIndex.load(tmp_path / "g.safetensors").dim == 16
    assert bundle.embed(images).shape == (6, 16)
    assert main(["export", "--bundle", str(root / "run" / "bundle"), "--format", "torchscript",
                 "--output", str(tmp_path / "m.pt"), "--check"]) == 0


def test_a_bundle_from_pretrained_weights_without_training(tmp_path, capsys):
    import torchvision

    torch.manual_seed(1)
    network = torchvision.models.resnet18(weights=None)
    torch.save(network.state_dict(), tmp_path / "resnet18.pth")
    assert main(["bundle", "--model-name", "resnet18", "--weights", str(tmp_path / "resnet18.pth"),
                 "--output", str(tmp_path / "b"), "--image-size", "64"]) == 0
    bundle = load_bundle(tmp_path / "b", device="cpu")
    assert bundle.threshold is None and bundle.image_size == 64 and bundle.embedding_dim == 512
    assert torch.equal(bundle.model.backbone.conv1.weight, network.conv1.weight)
    code = main(["bundle", "--model-name", "resnet18", "--embedding-dim", "128", "--output", str(tmp_path / "c")])
    assert code == 2 and "cannot have an embedding neck" in capsys.readouterr().err
    code = main(["bundle", "--model-name", "resnet18", "--checkpoint", "x.pt", "--output", str(tmp_path / "d")])
    assert code == 2 and "exactly one of --checkpoint" in capsys.readouterr().err


def test_calibrate_writes_the_threshold_the_library_computes(neck_run, tmp_path, capsys):
    import shutil

    root, csv_file = neck_run
    folder = tmp_path / "bundle"
    shutil.copytree(root / "run" / "bundle", folder)
    assert main(["calibrate", "--bundle", str(folder), "--data-csv", str(csv_file), "--num-refs", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    written = load_bundle(folder, device="cpu").threshold

    bundle = load_bundle(folder, device="cpu")
    df_gallery, df_query = split_gallery_query(load_csv(csv_file), num_refs=2, seed=0)
    names = {n: i for i, n in enumerate(sorted(set(df_gallery["label"]) | set(df_query["label"])))}
    expected = summary_metrics(
        bundle.embed(list(df_query["image"])), torch.tensor([names[v] for v in df_query["label"]]),
        bundle.embed(list(df_gallery["image"])), torch.tensor([names[v] for v in df_gallery["label"]]),
    ).threshold
    assert written is not None and written == pytest.approx(expected, abs=1e-7)
    assert f"{written:.6f}" in capsys.readouterr().out
    # The checksums still hold, and the FAR method gives another threshold.
    assert main(["calibrate", "--bundle", str(folder), "--data-csv", str(csv_file), "--target-far", "0.2",
                 "--no-progress", "--device", "cpu"]) == 0
    manifest = json.loads((folder / "bundle.json").read_text())
    assert manifest["threshold"] != pytest.approx(written, abs=1e-9)


def test_calibrate_can_set_test_time_views_and_calibrates_with_them(neck_run, tmp_path, capsys):
    import shutil

    from recognite.utils.views import ViewSpec

    root, csv_file = neck_run
    folder = tmp_path / "bundle"
    shutil.copytree(root / "run" / "bundle", folder)
    assert main(["calibrate", "--bundle", str(folder), "--data-csv", str(csv_file), "--num-refs", "2",
                 "--views-shift", "0.1", "--views-scales", "0.9", "--no-progress", "--device", "cpu"]) == 0
    bundle = load_bundle(folder, device="cpu")
    assert bundle.test_time_augmentation == ViewSpec(shift=0.1, scales=(0.9,))
    assert "6 per image" in capsys.readouterr().out
    df_gallery, df_query = split_gallery_query(load_csv(csv_file), num_refs=2, seed=0)
    names = {n: i for i, n in enumerate(sorted(set(df_gallery["label"]) | set(df_query["label"])))}
    with_views = summary_metrics(
        bundle.embed(list(df_query["image"])), torch.tensor([names[v] for v in df_query["label"]]),
        bundle.embed(list(df_gallery["image"])), torch.tensor([names[v] for v in df_gallery["label"]]),
    ).threshold
    assert bundle.threshold == pytest.approx(with_views, abs=1e-7)  # calibrated on the views' embeddings
    # --no-tta embeds each image alone; unset view options keep the bundle's; --views-shift 0 --views-scales removes
    # the run trained without flips (hflip 0): mirrored views are refused, and nothing changes
    assert main(["calibrate", "--bundle", str(folder), "--data-csv", str(csv_file), "--views-hflip",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "trained without horizontal flips" in capsys.readouterr().err
    assert load_bundle(folder, device="cpu").test_time_augmentation == ViewSpec(shift=0.1, scales=(0.9,))
    assert main(["calibrate", "--bundle", str(folder), "--data-csv", str(csv_file), "--views-shift", "0",
                 "--views-scales", "--no-views-hflip", "--no-progress", "--device", "cpu"]) == 0
    assert load_bundle(folder, device="cpu").test_time_augmentation is None
