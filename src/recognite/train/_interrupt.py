"""Turn Ctrl-C into a request to stop at the next step boundary (a second Ctrl-C stops at once)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)


class GracefulInterrupt:
    """Context manager: while active, the first SIGINT only sets :attr:`requested`.

    The training loop checks the flag after each optimizer step, so the checkpoint it then saves
    is consistent (parameters, optimizer, scheduler and step counter all after the same step).
    Outside the main thread (where signals cannot be handled) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (press again to stop at once).")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
