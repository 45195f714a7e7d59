"""The code of the seed documentation page runs exactly as written."""

from __future__ import annotations

import torch
import torchvision

from recognite.data import train_val_datasets

from .train.conftest import write_tiny_dataset


def test_seed_page_snippet_with_default_weights_from_the_hub_cache(tmp_path, monkeypatch):
    # Pretrained weights cannot be downloaded here: put a file where torch's hub cache keeps
    # ResNet50_Weights.DEFAULT, and make any download attempt fail loudly.
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    ds_train, _, _ = train_val_datasets(write_tiny_dataset(tmp_path / "data"), num_folds=2)

    # --- the snippet, as written on the page ---
    from recognite.model import Recognizer
    recog_model = Recognizer(
    model_name='resnet50',
    num_classes=len(ds_train.unique_labels),
    weights='DEFAULT',
    bias=False
    )
    # --------------------------------------------

    state = reference.state_dict()
    own = recog_model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert recog_model.classifier.out_features == 5 and recog_model.classifier.bias is None
    assert recog_model.embedding_dim == 2048
    recog_model.train()
    scores = recog_model(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 5) and scores.abs().max() <= 1 + 1e-6
