"""The data feeder (omni/data/prefetch.py) and resume by seek: micro-batches made ahead in a
background thread are the inline ones, in order, each with the data position right after it; an
error surfaces at its own micro-batch; a record stream resumed far into its sequence reads only
what it hands out."""
from __future__ import annotations

import pytest

from omni.data.loader import SkipCounter, TooManyBadSamples
from omni.data.prefetch import Feeder
from omni.data.stream import RecordStream


RECORDS = [{"i": i, "__where__": f"line {i}"} for i in range(17)]


def _make(record: dict) -> int:
    if record["i"] % 5 == 0:
        raise ValueError("a bad record")
    return record["i"]


def _feeder(depth: int, count: int = 12, max_fraction: float = 0.9) -> tuple[Feeder, RecordStream]:
    counter = SkipCounter(max_fraction=max_fraction, min_seen=1)
    stream = RecordStream(RECORDS, 3, _make, counter)
    return Feeder(stream, counter, lambda made: (list(made), len(made) / 4), lambda b: b, 4, count, depth), stream


@pytest.mark.parametrize("depth", [1, 3])
def test_made_ahead_is_made_inline_with_each_micro_batchs_position(depth):
    inline, _ = _feeder(0)
    ahead, stream = _feeder(depth)
    try:
        for _ in range(12):
            want, got = inline.next(), ahead.next()
            assert (got.batch, got.taken, got.consumed, got.state, got.counts) == \
                   (want.batch, want.taken, want.consumed, want.state, want.counts)
        # the positions a checkpoint keeps resume exactly where the micro-batch left off
        resumed = RecordStream(RECORDS, 3, _make, SkipCounter(max_fraction=0.9))
        resumed.restore([got.state])
        assert resumed.take(8) == RecordStream(RECORDS, 3, _make, SkipCounter(max_fraction=0.9)).take(56)[48:]
        with pytest.raises(RuntimeError, match="handed out"):
            ahead.next()
    finally:
        ahead.close()
    assert stream.consumed == want.consumed  # the thread took nothing past the micro-batches asked for


def test_an_error_is_raised_at_the_micro_batch_that_met_it():
    feeder, _ = _feeder(depth=2, max_fraction=0.15)
    handed = 0
    try:
        with pytest.raises(TooManyBadSamples):
            while True:
                feeder.next()
                handed += 1
    finally:
        feeder.close()
    inline, _ = _feeder(depth=0, max_fraction=0.15)
    for _ in range(handed):
        inline.next()
    with pytest.raises(TooManyBadSamples):
        inline.next()


class CountedRecords(list):
    """Records that count how many times one is read."""
    reads = 0

    def __getitem__(self, i):
        CountedRecords.reads += 1
        return super().__getitem__(i)


def test_a_record_stream_resumes_by_seeking_not_replaying():
    records = CountedRecords(range(10))
    whole = RecordStream(list(range(10)), 5, lambda r: r, SkipCounter())
    expected = whole.take(100_010)[100_000:]
    resumed = RecordStream(records, 5, lambda r: r, SkipCounter(), rank=1, world_size=2)
    CountedRecords.reads = 0
    resumed.restore([{"world_size": 2, "rank": r, "frontier": 0, "done": [], "next": 100_000 + r} for r in (0, 1)])
    assert resumed.take(5) == expected[1::2]
    assert CountedRecords.reads <= 10  # the 10 positions read since the frontier, none of the 100000 before
    assert resumed.state()["frontier"] == 100_000 and resumed.state()["next"] == 100_010
