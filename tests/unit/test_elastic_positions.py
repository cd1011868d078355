"""A data position of `data.partition: sample` re-splits over another number of processes: the
samples every rank consumed (good and bad) are passed over, every other one is consumed by exactly
one rank of the resumed run, even when the ranks skipped different numbers of bad samples."""
from __future__ import annotations

import pytest

from omni.config import ConfigError
from omni.data.loader import SkipCounter
from omni.data.stream import RecordStream, merged_position


def _make(record: dict) -> int:
    if record["i"] % 4 == 0:  # a bad record: skipped and counted, its position consumed all the same
        raise ValueError("a bad record")
    return record["i"]


def _ranks(world: int) -> list[RecordStream]:
    records = [{"i": i, "__where__": f"line {i}"} for i in range(23)]
    counter = SkipCounter(max_fraction=0.9)
    return [RecordStream(records, 7, _make, counter, rank=r, world_size=world) for r in range(world)]


def test_old_checkpoints_positions_are_read_as_counts_per_rank():
    assert merged_position([3, 2]) == (5, [])      # rank 0: 0 2 4, rank 1: 1 3
    assert merged_position([3, 1]) == (3, [4])     # 3 is rank 1's next: a gap before rank 0's 4
    with pytest.raises(ConfigError, match="partition: shard"):
        merged_position([{"workers": 0, "consumed": [3], "next": 0}])


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_a_position_re_splits_over_another_world_size(before, after):
    whole = _ranks(1)[0]
    whole.take(60)
    sequence = dict(whole.taken())  # position -> record, as one process reads it

    stopped = _ranks(before)
    for r, rank in enumerate(stopped):
        rank.take(5 + 3 * r)  # uneven: the ranks met different numbers of bad records
    seen = [p for rank in stopped for p, _ in rank.taken()]
    states = [rank.state() for rank in stopped]
    frontier, done = merged_position(states)
    assert sorted(seen) == list(range(frontier)) + done
    assert bool(done) == (before > 1)  # ranks that stopped at different places leave a gap

    resumed = _ranks(after)
    for rank in resumed:
        rank.restore(states)
        rank.take(6)
    again = [(p, k) for rank in resumed for p, k in rank.taken()]
    positions = sorted(seen + [p for p, _ in again])
    assert len(positions) == len(set(positions))  # none seen twice
    reached = min(rank.state()["next"] for rank in resumed)
    assert set(range(reached)) <= set(positions)  # none left out up to where every rank got
    assert all(sequence[p] == k for p, k in again)  # the very samples one process would read there
    assert sum(rank.consumed for rank in resumed) == len(positions)  # metrics count each sample once
