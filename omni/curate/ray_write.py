"""`--ray` output: the workers write the shards, under temporary names; the driver renames them.

A verb on Ray hands its map a `ShardWrites`: its `route` (rank, raw sample, map result) -> the
output set's stem, or None, is the verb's own choice of where a sample goes, run on the worker
next to the map. Each block's samples are written there by `ShardSink` (webdataset's
`ShardWriter`) as `shards/.partial/{stem}~{tag}-{k:06d}.tar`, where `tag` is the rank of the
block's first sample: a retried task writes the same names again (and `ShardSink` removes the
killed attempt's files of that name first), so a sample is never on disk twice. Only a light
copy of the sample (no media bytes) goes back to the driver, which keeps the verb's bookkeeping
(rejects, duplicates, counts) and counts each set in a `WrittenShards` in place of its
`ShardSink`. Once the whole map has finished, `commit` renames every set's files, in rank order,
to `{stem}-{000000..}.tar`; a job that fails before that leaves no file under a final name (its
temporary files are removed, and what a task still running then writes is removed by the next run).

Shard boundaries follow the blocks (one block per input shard, or per RECORDS_PER_BLOCK build
records): a shard holds at most `samples_per_shard` samples, as in-process, and the samples are
in the same order, but a block's last shard may be smaller.
"""
from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omni.curate.common import ShardSink

PARTIAL = ".partial"
KEPT_BYTES = ("__key__", "__url__", "json")   # members the driver's bookkeeping reads; media stay on the worker


def light(raw: dict, stem: str | None) -> dict:
    """The sample as the driver needs it: key, url and json; media members emptied; `__to__` the set it went to."""
    return {**{k: (v if k in KEPT_BYTES or not isinstance(v, bytes) else b"") for k, v in raw.items()},
            "__to__": stem}


@dataclass
class ShardWrites:
    """One verb run's output shards on Ray: what the workers need to write (folder, route, sizes) and
    what the driver learns (per-set counts, then shards) to check and rename them."""
    folder: Path
    route: Callable  # (rank, raw, result) -> stem | None; runs on the workers
    samples_per_shard: int = 5000
    shard_bytes: float = 5e8
    counts: Counter = field(default_factory=Counter)   # driver: samples the workers wrote, per stem
    shards: dict = field(default_factory=dict)         # driver, after commit: stem -> number of shards

    @property
    def partial(self) -> Path:
        return Path(self.folder) / PARTIAL

    def start(self) -> None:
        """Driver, before the map: no leftovers of an earlier failed job."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def write_block(self, tag: str, items: list[tuple[str | None, dict]]) -> None:
        """Worker: write one block's (stem, raw) items, each stem's in order, as `{stem}~{tag}` shards."""
        sinks: dict[str, ShardSink] = {}
        try:
            for stem, raw in items:
                if stem is None:
                    continue
                if stem not in sinks:
                    sinks[stem] = ShardSink(self.partial, f"{stem}~{tag}", self.samples_per_shard, self.shard_bytes)
                sinks[stem].write(raw)
        finally:
            for s in sinks.values():
                s.close()

    def sink(self, stem: str) -> "WrittenShards":
        return WrittenShards(self, stem)

    def seen(self, raw) -> None:
        """Driver: count a light sample the workers wrote."""
        if isinstance(raw, dict) and raw.get("__to__"):
            self.counts[raw["__to__"]] += 1

    def commit(self, sinks) -> None:
        """Driver, after the whole map: check the verb counted what the workers wrote, then rename every
        set's files in rank order to their final names (stale shards of those stems removed first)."""
        sinks = list(sinks.values() if isinstance(sinks, dict) else sinks)
        counted = Counter({s.stem: s.count for s in sinks if s is not None and s.count})
        if counted != +self.counts:
            self.abort()
            raise RuntimeError(f"--ray: the workers wrote {dict(self.counts)} samples per set, the verb counted "
                               f"{dict(counted)}; the verb's route and its loop disagree")
        folder = Path(self.folder)
        for stem in self.counts:
            files = sorted(self.partial.glob(f"{stem}~*.tar"))
            for old in folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                old.unlink()
            for i, f in enumerate(files):
                f.rename(folder / f"{stem}-{i:06d}.tar")
            self.shards[stem] = len(files)
        self.abort()
        for s in filter(None, sinks):
            s.bytes = sum(p.stat().st_size for p in s.shards())

    def abort(self) -> None:
        """Driver: drop every temporary file (a failed job, or after the commit)."""
        shutil.rmtree(self.partial, ignore_errors=True)


class WrittenShards(ShardSink):
    """A `ShardSink` whose samples the workers wrote: `write` only counts (and checks the worker put the
    sample in this set); shards, urls and bytes are those `ShardWrites.commit` renamed into place."""

    def __init__(self, writes: ShardWrites, stem: str):
        super().__init__(writes.folder, stem, writes.samples_per_shard, writes.shard_bytes)
        self.writes = writes

    def write(self, sample: dict) -> None:
        if sample.get("__to__") != self.stem:
            raise RuntimeError(f"--ray: sample {sample.get('__key__')!r} was written to {sample.get('__to__')!r}, "
                               f"the verb puts it in {self.stem!r}")
        self.count += 1

    def close(self) -> None:  # nothing open here; `commit` sets the bytes
        pass

    @property
    def num_shards(self) -> int:
        return self.writes.shards.get(self.stem, 0)


@contextmanager
def committed(writes: ShardWrites | None, sinks):
    """Around a verb's pass over a `--ray` map that writes: the workers' shards renamed into place
    when the pass has finished, all of them dropped when it failed. Nothing to do in-process."""
    if writes is None:
        yield
        return
    try:
        yield
    except BaseException:
        writes.abort()
        raise
    writes.commit(sinks)
