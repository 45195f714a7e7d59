"""Benchmark: `recognite serve` under N concurrent clients against the in-process ceiling.

For two bundles -- the demo's network (ResNet-18 at 32 px) and an untrained ResNet-18 at 224 px
(where the network, not HTTP, dominates, as in production) -- and a gallery of 1000 labels:

* ``in-process``: the same images through ``Bundle.embed`` (batches of 32) + ``GalleryIndex.recognize``
  in this process: the ceiling;
* ``serve``: a real ``recognite serve`` process on loopback, with batching on (``--max-batch-size
  32 --max-wait-ms 5``) and off (``--max-batch-size 1``), and 1, 4, 16, 64 client threads, each
  sending one-image ``POST /v1/recognize`` requests over a keep-alive connection: p50/p95/p99
  latency and images/s;
* memory: the server's resident memory (VmRSS) before and after 10,000 requests (demo bundle,
  16 clients, batching on).

The clients run on the same 2-core machine as the server, so they take CPU from it: the figures
are a floor for a server with its own machine. Weights are random (throughput does not depend on
them). Usage::

    python benchmarks/serve_bench.py                  # everything (about 6 minutes here)
    python benchmarks/serve_bench.py --quick          # fewer requests, for a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KEY = "bench-key-0123456789abcdef"


def _image_bytes(side: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _make_bundle(root: Path, image_size: int) -> tuple[Path, Path]:
    import torch

    from recognite.bundle import load_bundle, save_bundle
    from recognite.gallery import GalleryIndex
    from recognite.model import Recognizer

    torch.manual_seed(0)
    bundle_dir = save_bundle(Recognizer("resnet18").eval(), root / f"bundle{image_size}", image_size=image_size,
                             threshold=0.5)
    bundle = load_bundle(bundle_dir)
    gallery = GalleryIndex(model_id=bundle.weights_sha256)
    gallery.add(torch.randn(1000, bundle.embedding_dim), [f"label{i}" for i in range(1000)])
    path = Path(gallery.save(root / f"gallery{image_size}.safetensors"))
    return bundle_dir, path


def _in_process(bundle_dir: Path, gallery_path: Path, images: list[bytes], root: Path) -> float:
    from recognite.bundle import load_bundle
    from recognite.gallery import GalleryIndex

    bundle = load_bundle(bundle_dir, device="cpu")
    gallery = GalleryIndex.load(gallery_path)
    paths = []
    for i, data in enumerate(images):
        path = root / f"img{i}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
    bundle.embed(paths[:8])  # warm-up
    start = time.perf_counter()
    gallery.recognize(bundle.embed(paths, batch_size=32), k=5, threshold=bundle.threshold)
    return len(paths) / (time.perf_counter() - start)


def _body(data: bytes) -> tuple[bytes, str]:
    boundary = "bench-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _load(url: str, images: list[bytes], clients: int, requests_per_client: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        mine = []
        for step in range(requests_per_client):
            body, content_type = _body(images[(worker * 7919 + step) % len(images)])
            start = time.perf_counter()
            conn.request("POST", "/v1/recognize", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                failures.append(response.status)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: statuses {sorted(set(failures))}")
    quantiles = statistics.quantiles(latencies, n=100)
    return {"images_per_s": len(latencies) / elapsed, "p50": quantiles[49], "p95": quantiles[94], "p99": quantiles[98]}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    from serve._server import start_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--memory-requests", type=int, default=10_000)
    args = parser.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key_file = root / "key.txt"
        key_file.write_text(KEY)
        for image_size, side, total in ((32, 64, 1600), (224, 256, 192)):
            bundle_dir, gallery_path = _make_bundle(root, image_size)
            images = [_image_bytes(side, seed) for seed in range(64)]
            ceiling = _in_process(bundle_dir, gallery_path, images * max(1, int(total * scale) // 64), root)
            print(f"\n{image_size} px bundle: in-process ceiling {ceiling:.1f} images/s")
            print(f"{'batching':<9} {'clients':>7} {'images/s':>9} {'of ceiling':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
            for batching in ("on", "off"):
                extra = ["--max-batch-size", "32", "--max-wait-ms", "5"] if batching == "on" else ["--max-batch-size", "1"]
                proc, url = start_server(bundle_dir, gallery_path, key_file, *extra)
                try:
                    _load(url, images, 4, 2)  # warm-up
                    for clients in args.clients:
                        per_client = max(2, int(total * scale) // clients)
                        res = _load(url, images, clients, per_client)
                        print(f"{batching:<9} {clients:>7} {res['images_per_s']:>9.1f} {res['images_per_s'] / ceiling:>9.0%} "
                              f"{res['p50'] * 1000:>8.1f} {res['p95'] * 1000:>8.1f} {res['p99'] * 1000:>8.1f}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
            if image_size == 32:
                proc, url = start_server(bundle_dir, gallery_path, key_file, "--max-batch-size", "32")
                try:
                    _load(url, images, 16, 20)  # warm-up: allocator pools, first batches
                    before = _rss_mb(proc.pid)
                    count = int(args.memory_requests * (scale if args.quick else 1.0))
                    _load(url, images, 16, count // 16)
                    after = _rss_mb(proc.pid)
                    print(f"memory: resident {before:.0f} MB before, {after:.0f} MB after {count:,} requests "
                          f"({(after - before) / before:+.1%}; target within 5 %)")
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
