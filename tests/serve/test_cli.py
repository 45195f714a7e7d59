"""`recognite serve` options: keys, TLS pairing, the warning for a network address without TLS."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("uvicorn")

from recognite.cli.main import main
from recognite.serve.settings import ServeSettings, is_loopback, read_api_key

from .conftest import API_KEY


@pytest.fixture
def fake_uvicorn(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    return calls


def test_serve_runs_uvicorn_with_the_options(bundle_dir, tmp_path, fake_uvicorn, caplog):
    key = tmp_path / "key"
    key.write_text(API_KEY + "\n")
    cert, private = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    private.write_text("x")
    with caplog.at_level(logging.WARNING, logger="recognite"):
        assert main(["serve", "--bundle", str(bundle_dir), "--gallery", str(tmp_path / "g.safetensors"),
                     "--api-key-file", str(key), "--port", "8123", "--max-batch-size", "4", "--device", "cpu",
                     "--ssl-certfile", str(cert), "--ssl-keyfile", str(private)]) == 0
    (app, kwargs), = fake_uvicorn
    assert kwargs["port"] == 8123 and kwargs["host"] == "127.0.0.1" and kwargs["ssl_certfile"] == str(cert)
    assert app.state.settings.api_key == API_KEY and app.state.settings.max_batch_size == 4
    assert "without TLS" not in caplog.text


def test_a_network_address_without_tls_warns(bundle_dir, tmp_path, fake_uvicorn, caplog):
    with caplog.at_level(logging.WARNING, logger="recognite"):
        assert main(["serve", "--bundle", str(bundle_dir), "--gallery", str(tmp_path / "g.safetensors"),
                     "--host", "0.0.0.0", "--device", "cpu"]) == 0
    assert "without TLS" in caplog.text and len(fake_uvicorn) == 1


@pytest.mark.parametrize("args, words", [
    (["--ssl-certfile", "c.pem"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--api-key-file", "missing.key"], "--api-key-file"),
    (["--max-batch-size", "0"], "max_batch_size"),
])
def test_bad_options_are_one_line_errors(bundle_dir, tmp_path, fake_uvicorn, capsys, args, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pem").write_text("x")
    code = main(["serve", "--bundle", str(bundle_dir), "--gallery", "g.safetensors", *args])
    assert code == 2 and words in capsys.readouterr().err and not fake_uvicorn


def test_keys_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOGNITE_API_KEY", " from-the-environment-123 ")
    assert read_api_key(None) == "from-the-environment-123"
    (tmp_path / "k").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(tmp_path / "k")
    monkeypatch.delenv("RECOGNITE_API_KEY")
    assert read_api_key(None) is None
    with pytest.raises(ValueError, match="at least 16"):
        ServeSettings(api_key="short")
    with pytest.raises(ValueError, match="max_wait_ms"):
        ServeSettings(max_wait_ms=-1)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
