"""Micro-batches made ahead: a background thread takes, makes and collates the next micro-batches
of a `Stream` while the training step runs, so the step waits for data only when making a
micro-batch takes longer than a step (`data.prefetch`, docs/data.md).

The items and their order are the stream's own: one thread takes from the stream, in the order the
inline path would. Everything the trainer reads about the data position travels with each
micro-batch, as it was right after that micro-batch was taken: the stream's `state()`, `taken()`
and `consumed` and the SkipCounter's counts, so a checkpoint written after step k holds step k's
position even though the thread has already taken step k+1's items. An error while making a
micro-batch (too many bad samples, an unreadable dataset) is raised by `next()` at that micro-batch,
where the inline path would raise it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omni.data.loader import SkipCounter
from omni.data.stream import Stream


@dataclass
class MicroBatch:
    """One collated micro-batch and the data position right after its items were taken."""
    made: list                      # the items (objective.make's), for token counts
    batch: Any                      # objective.collate's batch, on the device
    fill: float                     # real tokens / batch tokens
    taken: list                     # stream.taken(): the raw samples consumed for it
    consumed: int                   # stream.consumed after it
    state: Any                      # stream.state() after it (for a checkpoint)
    counts: list[int]               # SkipCounter.state() after it: [good, skipped]


class Feeder:
    """`count` micro-batches of `size` items from `stream`, collated by `collate` and moved by
    `place` (to the device); `depth` > 0 makes up to that many ahead in a background thread, 0
    makes each when asked. `wait_s` adds up the seconds `next()` waited for data."""

    def __init__(self, stream: Stream, counter: SkipCounter, collate: Callable[[list], tuple[Any, float]],
                 place: Callable[[Any], Any], size: int, count: int, depth: int):
        self.stream, self.counter, self.collate, self.place = stream, counter, collate, place
        self.size, self.left, self.depth = size, count, depth
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self) -> MicroBatch:
        made = self.stream.take(self.size)
        batch, fill = self.collate(made)
        return MicroBatch(made, self.place(batch), fill, self.stream.taken(), self.stream.consumed,
                          self.stream.state(), self.counter.state())

    def _run(self, count: int) -> None:
        for _ in range(count):
            try:
                item = self._make()
            except BaseException as e:  # noqa: BLE001 - raised by next() in the training thread
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def next(self) -> MicroBatch:
        """The next micro-batch (raises what making it raised)."""
        if self.left <= 0:
            raise RuntimeError("Feeder: every micro-batch it was asked for has been handed out")
        self.left -= 1
        t0 = time.perf_counter()
        if self.depth == 0 or self._thread is None:
            # the first one is made here, in the calling thread: a stream that forks decode workers
            # (ShardStream) forks before any other thread of ours runs
            item = self._make()
            if self.depth and self.left:
                self._thread = threading.Thread(target=self._run, args=(self.left,), daemon=True,
                                                name="omni-data-feeder")
                self._thread.start()
        else:
            item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (it ends after the micro-batch it is making)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
