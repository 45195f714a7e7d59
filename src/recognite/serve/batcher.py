"""Concurrent requests' images embedded together, in one forward pass per batch.

A batch starts with the first queued image, takes every image already queued and waits at most
``max_wait_ms`` for more (so a burst of requests shares one pass); it holds at most
``max_batch_size`` images. The forward pass runs in one worker thread, so the
event loop keeps accepting requests meanwhile; ``max_batch_size=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["BatchEmbedder"]

logger = logging.getLogger(__name__)


class BatchEmbedder:
    """Collects ``(3, S, S)`` image tensors from many coroutines into batches for ``model``.

    Args:
        model: Maps ``(B, 3, S, S)`` to ``(B, D)`` embeddings (``Recognizer.embed``).
        device: Where the model runs.
        max_batch_size: Most images per forward pass (1 = no batching).
        max_wait_ms: Longest an image waits for others before its batch runs.
        on_batch: Called with the size of every batch run (for the metrics).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], device: torch.device, max_batch_size: int,
                 max_wait_ms: float, on_batch: Callable[[int], None] | None = None) -> None:
        self._model = model
        self._device = device
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop (call from the event loop that will use :meth:`embed`)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="recognite-forward")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop; images still queued get a ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` images -> ``(N, D)`` embeddings, batched with other callers' images."""
        if self._queue is None:
            raise RuntimeError("BatchEmbedder.start() was not called")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self._queue.put_nowait((image, future))
            futures.append(future)
        return torch.stack(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        if self._queue is None:
            raise RuntimeError("BatchEmbedder.start() was not called")
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(image, future) for image, future in batch if not future.cancelled()]

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._model(images.to(self._device)).float().cpu()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                embeddings = await loop.run_in_executor(self._executor, self._forward,
                                                        torch.stack([image for image, _ in batch]))
            except Exception as exc:  # handed to every waiting request
                logger.exception("The forward pass of a batch of %d images failed.", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            for row, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(embeddings[row])
