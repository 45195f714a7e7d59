"""Counters and histograms of the service, rendered in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Histogram", "ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the request latency histogram."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds of the forward-pass batch size histogram."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}" if pairs else ""


class Histogram:
    """Cumulative-bucket histogram (not thread-safe on its own: :class:`ServiceMetrics` locks)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, pairs: Sequence[tuple[str, str]] = ()) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*self.buckets, float("inf")], self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f"{name}_bucket{_labels([*pairs, ('le', le)])} {running}")
        out.append(f"{name}_sum{_labels(pairs)} {self.total!r}")
        out.append(f"{name}_count{_labels(pairs)} {running}")
        return out


class ServiceMetrics:
    """What ``GET /metrics`` reports: requests and errors by route and status, request latency,
    forward-pass batch sizes and images, and the gallery's size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._batches = Histogram(BATCH_BUCKETS)
        self._images = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault((method, route), Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(size)
            self._images += size

    def render(self, gallery_references: int, gallery_labels: int) -> str:
        """The metrics page (text format 0.0.4)."""
        with self._lock:
            lines = ["# HELP recognite_requests_total HTTP requests answered, by method, route and status.",
                     "# TYPE recognite_requests_total counter"]
            for (method, route, status), count in sorted(self._requests.items()):
                lines.append(f"recognite_requests_total{_labels([('method', method), ('route', route), ('status', str(status))])} {count}")
            lines += ["# HELP recognite_request_errors_total HTTP requests answered with a status of 400 or more.",
                      "# TYPE recognite_request_errors_total counter"]
            errors: dict[tuple[str, str], int] = {}
            for (method, route, status), count in self._requests.items():
                if status >= 400:
                    errors[method, route] = errors.get((method, route), 0) + count
            for (method, route), count in sorted(errors.items()):
                lines.append(f"recognite_request_errors_total{_labels([('method', method), ('route', route)])} {count}")
            lines += ["# HELP recognite_request_duration_seconds Time to answer a request.",
                      "# TYPE recognite_request_duration_seconds histogram"]
            for (method, route), histogram in sorted(self._latency.items()):
                lines += histogram.lines("recognite_request_duration_seconds", [("method", method), ("route", route)])
            lines += ["# HELP recognite_batch_size Images per forward pass of the model.",
                      "# TYPE recognite_batch_size histogram", *self._batches.lines("recognite_batch_size"),
                      "# HELP recognite_images_embedded_total Images embedded by the model.",
                      "# TYPE recognite_images_embedded_total counter", f"recognite_images_embedded_total {self._images}"]
        lines += ["# HELP recognite_gallery_references References in the gallery.",
                  "# TYPE recognite_gallery_references gauge", f"recognite_gallery_references {gallery_references}",
                  "# HELP recognite_gallery_labels Labels in the gallery.",
                  "# TYPE recognite_gallery_labels gauge", f"recognite_gallery_labels {gallery_labels}"]
        return "\n".join(lines) + "\n"
