"""Every endpoint and error of the service, through FastAPI's test client."""

from __future__ import annotations

import io
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from recognite.bundle import load_bundle
from recognite.gallery import GalleryIndex
from recognite.serve import ServeSettings, create_app

from .conftest import API_KEY, huge_png_header, noise, png_bytes, red, stripes

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def files(*items: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture
def client(bundle_dir, tmp_path):
    app = create_app(bundle_dir, tmp_path / "gallery.safetensors", ServeSettings(api_key=API_KEY), device="cpu")
    with TestClient(app) as test_client:
        yield test_client


def reference_embedding(bundle_dir, tmp_path, array: np.ndarray) -> torch.Tensor:
    """The embedding of an image through the library's file path (the independent reference)."""
    path = tmp_path / f"ref_{abs(hash(array.tobytes()))}.png"
    Image.fromarray(array).save(path)
    return load_bundle(bundle_dir).embed([str(path)])


def test_recognize_matches_the_library_in_process(client, bundle_dir, tmp_path):
    assert client.post("/v1/gallery/red", files=files(("r.png", png_bytes(red()))), headers=AUTH).status_code == 201
    assert client.post("/v1/gallery/stripes", files=files(("s.png", png_bytes(stripes()))), headers=AUTH).status_code == 201
    answer = client.post("/v1/recognize", files=files(("q1.png", png_bytes(red())), ("q2.png", png_bytes(noise()))),
                         data={"top_k": "2"})
    assert answer.status_code == 200
    body = answer.json()
    gallery = GalleryIndex()
    gallery.add(torch.cat([reference_embedding(bundle_dir, tmp_path, red()),
                           reference_embedding(bundle_dir, tmp_path, stripes())]), ["red", "stripes"])
    queries = torch.cat([reference_embedding(bundle_dir, tmp_path, red()), reference_embedding(bundle_dir, tmp_path, noise())])
    expected = gallery.recognize(queries, k=2, threshold=0.5)
    assert body["threshold"] == 0.5 and body["gallery_references"] == 2
    for got, want_labels, want_scores, want_pred in zip(body["results"], expected.labels, expected.scores.tolist(),
                                                        expected.predictions):
        assert [entry["label"] for entry in got["top_k"]] == want_labels
        assert [entry["score"] for entry in got["top_k"]] == pytest.approx(want_scores, abs=1e-5)
        assert got["prediction"] == want_pred and got["accepted"] == (want_pred != "unknown")
    assert body["results"][0]["prediction"] == "red" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # a threshold above every score answers unknown; the type comes from the bytes, not the name
    strict = client.post("/v1/recognize", files=files(("photo.txt", png_bytes(red(), "JPEG"))), data={"threshold": "1"})
    assert strict.json()["results"][0]["prediction"] in ("unknown", "red")
    high = client.post("/v1/recognize", files=files(("q.png", png_bytes(noise()))), data={"threshold": "0.9999"})
    assert high.json()["results"][0]["prediction"] == "unknown"


def test_empty_gallery_answers_unknown(client):
    body = client.post("/v1/recognize", files=files(("q.png", png_bytes(red())))).json()
    assert body["results"] == [{"filename": "q.png", "prediction": "unknown", "accepted": False, "score": None, "top_k": []}]


def test_enrolment_is_durable_idempotent_and_removable(client, tmp_path):
    path = tmp_path / "gallery.safetensors"
    first = client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red())), ("b.png", png_bytes(noise()))),
                        headers=AUTH)
    assert first.status_code == 201
    assert first.json() == {"label": "red", "added": 2, "skipped": 0, "references": 2,
                            "gallery": {"references": 2, "labels": 1}}
    on_disk = GalleryIndex.load(path)  # acknowledged = on disk
    assert on_disk.label_counts() == {"red": 2}
    again = client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red()))), headers=AUTH).json()
    assert (again["added"], again["skipped"], again["references"]) == (0, 1, 2)
    odd = "a/b c é"  # URL-encoded, slash included
    assert client.post(f"/v1/gallery/{urllib.parse.quote(odd, safe='')}", files=files(("s.png", png_bytes(stripes()))),
                       headers=AUTH).status_code == 201
    listing = client.get("/v1/gallery").json()
    assert listing == {"references": 3, "labels": 2,
                       "counts": [{"label": odd, "references": 1}, {"label": "red", "references": 2}]}
    removed = client.delete("/v1/gallery/red", headers=AUTH)
    assert removed.status_code == 200 and removed.json()["removed"] == 2
    assert GalleryIndex.load(path).label_counts() == {odd: 1}
    missing = client.delete("/v1/gallery/red", headers=AUTH)
    assert missing.status_code == 404 and "red" in missing.json()["error"]["message"]


@pytest.mark.parametrize("headers, status, words", [
    ({}, 401, "Authorization: Bearer"),
    ({"Authorization": "Basic abc"}, 401, "Bearer"),
    ({"Authorization": "Bearer wrong-key-0123456789"}, 403, "wrong"),
])
def test_enrolment_and_removal_need_the_key(client, headers, status, words):
    for response in (client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red()))), headers=headers),
                     client.delete("/v1/gallery/red", headers=headers)):
        assert response.status_code == status
        assert words in response.json()["error"]["message"]
    assert client.get("/v1/gallery").json()["references"] == 0


def test_without_a_configured_key_enrolment_is_disabled(bundle_dir, tmp_path):
    with TestClient(create_app(bundle_dir, tmp_path / "g.safetensors", device="cpu")) as test_client:
        response = test_client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red()))), headers=AUTH)
        assert response.status_code == 403 and "disabled" in response.json()["error"]["message"]
        assert not (tmp_path / "g.safetensors").exists()


def test_recognition_can_require_the_key(bundle_dir, tmp_path):
    settings = ServeSettings(api_key=API_KEY, require_key_for_recognize=True)
    with TestClient(create_app(bundle_dir, tmp_path / "g.safetensors", settings, device="cpu")) as test_client:
        assert test_client.post("/v1/recognize", files=files(("a.png", png_bytes(red())))).status_code == 401
        assert test_client.get("/v1/gallery").status_code == 401
        assert test_client.post("/v1/recognize", files=files(("a.png", png_bytes(red()))), headers=AUTH).status_code == 200


@pytest.mark.parametrize("upload, data, status, words", [
    (("x.png", b"hello, not an image"), {}, 415, "not an image"),
    (("x.png", b""), {}, 400, "empty"),
    (("x.png", png_bytes(red())[:60]), {}, 400, "corrupt or truncated PNG"),
    (("bomb.png", huge_png_header(9000, 9000)), {}, 413, "9000 x 9000 pixels, over the limit of 40,000,000"),
    (("bomb.png", huge_png_header(20000, 20000)), {}, 413, "more than 40,000,000 pixels"),
    (("x.png", png_bytes(red())), {"top_k": "0"}, 400, "top_k"),
    (("x.png", png_bytes(red())), {"top_k": "abc"}, 400, "top_k"),
    (("x.png", png_bytes(red())), {"threshold": "2"}, 400, "threshold"),
    (("x.png", png_bytes(red())), {"threshold": "nan"}, 400, "threshold"),
])
def test_bad_uploads_get_a_named_error_and_status(client, upload, data, status, words):
    response = client.post("/v1/recognize", files=files(upload), data=data)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["status"] == status and words in body["error"]["message"]


def test_missing_images_and_reserved_labels(client):
    response = client.post("/v1/recognize")
    assert response.status_code == 400 and "images" in response.json()["error"]["message"]
    for label, words in (("unknown", "reserved"), ("%20red", "spaces"), ("a%01b", "control")):
        response = client.post(f"/v1/gallery/{label}", files=files(("a.png", png_bytes(red()))), headers=AUTH)
        assert response.status_code == 400 and words in response.json()["error"]["message"], label


def test_size_limits(bundle_dir, tmp_path):
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 KB
    settings = ServeSettings(api_key=API_KEY, max_image_bytes=len(big) - 1, max_images=2, max_pixels=40 * 56)
    with TestClient(create_app(bundle_dir, tmp_path / "g.safetensors", settings, device="cpu")) as test_client:
        too_big = test_client.post("/v1/recognize", files=files(("big.png", big)))
        assert too_big.status_code == 413 and "bytes" in too_big.json()["error"]["message"]
        too_many = test_client.post("/v1/recognize", files=files(*[("r.png", png_bytes(red()))] * 3))
        assert too_many.status_code == 413 and "limit is 2" in too_many.json()["error"]["message"]
        body = io.BytesIO(b"x" * (settings.max_request_bytes + 1))
        whole = test_client.post("/v1/recognize", content=body.getvalue(),
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert whole.status_code == 413 and "request body" in whole.json()["error"]["message"]
        wide = test_client.post("/v1/recognize", files=files(("w.png", png_bytes(np.zeros((40, 57, 3), np.uint8)))))
        assert wide.status_code == 413 and "57 x 40" in wide.json()["error"]["message"]
        assert test_client.post("/v1/recognize", files=files(("r.png", png_bytes(red())))).status_code == 200


def test_health_page_openapi_and_metrics(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["image_size"] == 32 and health["threshold"] == 0.5
    assert health["enrolment"] is True and health["gallery"] == {"references": 0, "labels": 0}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/recognize" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recognize", "/v1/gallery", "/v1/gallery/{label}", "/healthz", "/metrics"} <= set(paths)
    client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red())), ("b.png", png_bytes(noise()))), headers=AUTH)
    client.post("/v1/recognize", files=files(("x.png", b"nope")))
    text = client.get("/metrics").text
    lines = set(text.splitlines())
    assert 'recognite_requests_total{method="POST",route="/v1/recognize",status="415"} 1' in lines
    assert 'recognite_request_errors_total{method="POST",route="/v1/recognize"} 1' in lines
    assert "recognite_gallery_references 2" in lines and "recognite_gallery_labels 1" in lines
    assert "recognite_images_embedded_total 2" in lines
    assert 'recognite_batch_size_bucket{le="+Inf"} 1' in lines  # both images of the request in one pass
    count = [line for line in lines if line.startswith('recognite_request_duration_seconds_count{method="GET",route="/healthz"}')]
    assert count == ['recognite_request_duration_seconds_count{method="GET",route="/healthz"} 1']


def test_an_unexpected_failure_is_a_json_500(bundle_dir, tmp_path, monkeypatch):
    app = create_app(bundle_dir, tmp_path / "g.safetensors", ServeSettings(api_key=API_KEY), device="cpu")
    monkeypatch.setattr(app.state.store, "enrol", lambda *args: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.post("/v1/gallery/red", files=files(("a.png", png_bytes(red()))), headers=AUTH)
        assert response.status_code == 500 and "RuntimeError" in response.json()["error"]["message"]
        assert "disk on fire" not in response.text  # details go to the log, not to the client
        assert 'route="/v1/gallery/{label:path}",status="500"' in test_client.get("/metrics").text


def test_a_bundle_with_test_time_views_is_served_with_them(bundle_dir, tmp_path):
    import shutil

    from recognite.bundle import write_test_time_augmentation
    from recognite.utils.views import ViewSpec

    folder = tmp_path / "views_bundle"
    shutil.copytree(bundle_dir, folder)
    write_test_time_augmentation(folder, ViewSpec(shift=0.1, scales=(0.9,)))
    app = create_app(folder, tmp_path / "g.safetensors", ServeSettings(api_key=API_KEY), device="cpu")
    with TestClient(app) as test_client:
        test_client.post("/v1/gallery/red", files=files(("r.png", png_bytes(red()))), headers=AUTH)
        test_client.post("/v1/gallery/stripes", files=files(("s.png", png_bytes(stripes()))), headers=AUTH)
        body = test_client.post("/v1/recognize", files=files(("n.png", png_bytes(noise()))), data={"top_k": "2"}).json()
    bundle = load_bundle(folder)
    paths = []
    for name, array in (("r", red()), ("s", stripes()), ("n", noise())):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    embeddings = bundle.embed(paths)  # the library's path, views included
    gallery = GalleryIndex()
    gallery.add(embeddings[:2], ["red", "stripes"])
    expected = gallery.recognize(embeddings[2:], k=2)
    got = body["results"][0]["top_k"]
    assert [entry["label"] for entry in got] == expected.labels[0]
    assert [entry["score"] for entry in got] == pytest.approx(expected.scores[0].tolist(), abs=1e-5)
    plain = bundle.embed(paths, tta=False)
    plain_gallery = GalleryIndex()
    plain_gallery.add(plain[:2], ["red", "stripes"])
    assert float(plain_gallery.recognize(plain[2:], k=1).scores[0, 0]) != pytest.approx(float(expected.scores[0, 0]), abs=1e-5)


def test_a_bundle_with_enrolment_views_enrols_each_image_as_its_views(bundle_dir, tmp_path):
    import shutil

    from recognite.bundle import write_enrolment_augmentation
    from recognite.utils.views import EnrolmentAugmentation, ViewSpec

    folder = tmp_path / "enrol_bundle"
    shutil.copytree(bundle_dir, folder)
    write_enrolment_augmentation(folder, EnrolmentAugmentation(ViewSpec(rotations=(-10.0, 10.0)), "max"))
    app = create_app(folder, tmp_path / "g.safetensors", ServeSettings(api_key=API_KEY), device="cpu")
    with TestClient(app) as test_client:
        added = test_client.post("/v1/gallery/red", files=files(("r.png", png_bytes(red()))), headers=AUTH).json()
        again = test_client.post("/v1/gallery/red", files=files(("r.png", png_bytes(red()))), headers=AUTH).json()
        body = test_client.post("/v1/recognize", files=files(("n.png", png_bytes(noise()))), data={"top_k": "1"}).json()
    assert added["added"] == 1 and again["added"] == 0  # one image (3 rows), not enrolled twice
    gallery = GalleryIndex.load(tmp_path / "g.safetensors")
    assert len(gallery) == 3 and len(set(gallery.ids)) == 1
    bundle = load_bundle(folder)
    Image.fromarray(red()).save(tmp_path / "r.png")
    Image.fromarray(noise()).save(tmp_path / "n.png")
    rows = bundle.embed_references([str(tmp_path / "r.png")])[0]  # the library's enrolment
    torch.testing.assert_close(gallery.embeddings, torch.nn.functional.normalize(rows, dim=1), atol=1e-5, rtol=1e-5)
    query = bundle.embed([str(tmp_path / "n.png")])
    best = float((torch.nn.functional.normalize(query, dim=1) @ gallery.embeddings.T).max())
    assert body["results"][0]["top_k"][0]["score"] == pytest.approx(best, abs=1e-5)


def test_a_bundle_with_stored_re_ranking_is_served_with_it(bundle_dir, tmp_path):
    import shutil

    from recognite.bundle import write_reranking
    from recognite.gallery.k_reciprocal import KReciprocal
    from recognite.utils.reranking import Reranking

    folder = tmp_path / "rerank_bundle"
    shutil.copytree(bundle_dir, folder)
    settings = KReciprocal(k1=2, k2=1, top_n=3)
    write_reranking(folder, Reranking(k_reciprocal=settings))
    app = create_app(folder, tmp_path / "g.safetensors", ServeSettings(api_key=API_KEY), device="cpu")
    images = {"r": red(), "s": stripes(), "n": noise()}
    with TestClient(app) as test_client:
        for label in ("red", "red2"):
            test_client.post(f"/v1/gallery/{label}", files=files((f"{label}.png", png_bytes(images["r"]))), headers=AUTH)
        test_client.post("/v1/gallery/stripes", files=files(("s.png", png_bytes(images["s"]))), headers=AUTH)
        body = test_client.post("/v1/recognize", files=files(("n.png", png_bytes(images["n"]))), data={"top_k": "3"}).json()
    gallery = GalleryIndex.load(tmp_path / "g.safetensors")
    Image.fromarray(images["n"]).save(tmp_path / "n.png")
    query = load_bundle(folder).embed([str(tmp_path / "n.png")])
    expected = gallery.recognize(query, k=3, k_reciprocal=settings)
    got = body["results"][0]["top_k"]
    assert [entry["label"] for entry in got] == expected.labels[0]
    assert [entry["score"] for entry in got] == pytest.approx(expected.scores[0].tolist(), abs=1e-5)
    assert expected.scores[0].tolist() != pytest.approx(gallery.recognize(query, k=3).scores[0].tolist(), abs=1e-5)
