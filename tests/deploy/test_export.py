"""ONNX / TorchScript export: parity with PyTorch, dynamic batch size, metadata, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from recognite.export import (
    ExportMismatchError,
    check_export,
    export_onnx,
    export_torchscript,
)

from .conftest import IMAGE_SIZE, make_model

# The tests load TorchScript files themselves; torch 2.9+ warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_onnx_matches_pytorch_with_another_batch_size(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export_onnx(model, tmp_path / "m.onnx", IMAGE_SIZE, metadata={"preprocessing": {"mean": [0.5]}})
    assert check_export(model, path, "onnx", IMAGE_SIZE, atol=1e-4) <= 1e-4
    x = _batch(5, seed=7)  # exported with a batch of 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model.embed(x)
    assert out.shape == (5, 512)
    assert float((torch.from_numpy(out) - expected).abs().max()) <= 1e-4
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert props["image_size"] == IMAGE_SIZE and props["preprocessing"] == {"mean": [0.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_torchscript_matches_pytorch_with_another_batch_size(model, tmp_path):
    path = export_torchscript(model, tmp_path / "m.pt", IMAGE_SIZE, metadata={"threshold": 0.5})
    assert check_export(model, path, "torchscript", IMAGE_SIZE, atol=1e-5) <= 1e-5
    extra = {"recognite.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    x = _batch(5, seed=8)
    with torch.no_grad():
        diff = float((loaded(x) - model.embed(x)).abs().max())
    assert diff <= 1e-5
    assert json.loads(extra["recognite.json"])["threshold"] == 0.5
    assert model.training is False


def test_export_normalizes_unnormalized_models(tmp_path):
    raw = make_model(seed=4, normalize=False)
    path = export_torchscript(raw, tmp_path / "raw.pt", IMAGE_SIZE)
    x = _batch(3, seed=9)
    with torch.no_grad():
        out = torch.jit.load(str(path))(x)
        features = raw.embed(x)
    assert not torch.allclose(features.norm(dim=1), torch.ones(3))  # the model itself does not normalize
    torch.testing.assert_close(out, F.normalize(features, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_check_export_detects_a_different_model(model, tmp_path):
    path = export_torchscript(model, tmp_path / "m.pt", IMAGE_SIZE)
    other = make_model(seed=11, num_classes=3)
    with pytest.raises(ExportMismatchError, match="differs from PyTorch by .* more than the tolerance 1e-05"):
        check_export(other, path, "torchscript", IMAGE_SIZE)


def test_export_argument_errors(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, got 'tflite'"):
        check_export(model, tmp_path / "m.pt", "tflite", IMAGE_SIZE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_export(model, tmp_path / "m.pt", "torchscript", IMAGE_SIZE)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        export_torchscript(model, tmp_path / "m.pt", -1)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'recognite\[onnx\]'"):
        export_onnx(model, tmp_path / "m.onnx", IMAGE_SIZE)
    assert list(tmp_path.iterdir()) == []
