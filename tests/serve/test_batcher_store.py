"""Batching of concurrent requests, and the gallery store's serialised, durable edits."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from recognite.gallery import GalleryIndex
from recognite.serve.batcher import BatchEmbedder
from recognite.serve.store import GalleryStore


class CountingModel:
    """Embeds an image as its mean per channel; records every batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.shape[0])
        return images.mean(dim=(2, 3))


async def _run(model: CountingModel, sizes: list[int], max_batch: int, max_wait_ms: float):
    seen: list[int] = []
    batcher = BatchEmbedder(model, torch.device("cpu"), max_batch, max_wait_ms, on_batch=seen.append)
    await batcher.start()
    try:
        requests = [torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(batcher.embed(images) for images in requests))
    finally:
        await batcher.stop()
    return requests, outs, seen


@pytest.mark.parametrize("max_batch, expected", [(4, [4, 4, 2]), (1, [1] * 10), (64, [10])])
def test_concurrent_requests_share_forward_passes(max_batch, expected):
    model = CountingModel()
    requests, outs, seen = asyncio.run(_run(model, [1, 2, 3, 1, 3], max_batch, max_wait_ms=50))
    assert model.batches == expected and seen == expected
    for images, out in zip(requests, outs):  # every caller gets its own images' embeddings, in order
        assert torch.equal(out, images.mean(dim=(2, 3)))


def test_a_failing_forward_pass_fails_its_requests_only():
    class Flaky(CountingModel):
        def __call__(self, images):
            if not self.batches:
                self.batches.append(-1)
                raise RuntimeError("boom")
            return super().__call__(images)

    async def scenario():
        batcher = BatchEmbedder(Flaky(), torch.device("cpu"), 8, 0.0)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.embed(torch.zeros(2, 3, 4, 4))
            return await batcher.embed(torch.ones(1, 3, 4, 4))
        finally:
            await batcher.stop()

    assert torch.equal(asyncio.run(scenario()), torch.ones(1, 3))


def test_concurrent_enrolments_lose_nothing_and_reach_the_disk(tmp_path):
    path = tmp_path / "g.safetensors"
    store = GalleryStore(path, model_id="m" * 64)
    errors = []

    def enrol(worker: int) -> None:
        try:
            for step in range(5):
                emb = torch.randn(2, 8)
                store.enrol(f"w{worker}-{step}", emb, [f"sha256:{worker}-{step}-{i}" for i in range(2)])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=enrol, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = {f"w{w}-{s}": 2 for w in range(4) for s in range(5)}
    assert store.gallery.label_counts() == expected
    assert GalleryIndex.load(path).label_counts() == expected
    assert GalleryIndex.load(path).model_id == "m" * 64


def test_an_outside_writer_is_seen_and_another_model_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    store = GalleryStore(path, model_id="a" * 64)
    store.enrol("one", torch.randn(1, 8), ["sha256:1"])
    outside = GalleryIndex.load(path)  # e.g. `recognite gallery add` beside the service
    outside.add(torch.randn(1, 8), ["two"], ids=["x.png"])
    outside.save(path)
    store.enrol("three", torch.randn(1, 8), ["sha256:3"])
    assert GalleryIndex.load(path).label_counts() == {"one": 1, "two": 1, "three": 1}
    assert store.remove("two") == 1
    with pytest.raises(KeyError):
        store.remove("two")
    with pytest.raises(ValueError, match="another model"):
        GalleryStore(path, model_id="b" * 64)
