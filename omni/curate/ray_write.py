"""`--ray` output through Ray Data's write API: `ShardDatasink`, a `ray.data.Datasink`.

A verb that writes on Ray ends its pipeline in `Dataset.write_datasink(ShardDatasink(...))`:

- `write(blocks, ctx)`, in each write task (fused with the read and the map): every sample goes
  where the verb's `route` (rank, raw, map result) -> output set's stem, or None, says, written by
  `ShardSink` (webdataset's `ShardWriter`) as `shards/.partial/{stem}~{tag}-{k:06d}.tar`, `tag`
  being the rank of the task's first sample; a light copy of every row (no media bytes) goes to
  `shards/.partial/rows/{tag}.pkl`. The task returns only its tag and its count per set. A task
  rerun after its worker died writes the same names again (`ShardSink` removes the killed
  attempt's files of that name first), so a sample is never on disk twice.
- `on_write_complete(result)`, on the driver once every task has finished: the verb's own loop
  (`fold`) reads the light rows file by file in rank order, so its reports, rejects and counts see
  the in-process sequence; then the per-set counts the verb made are checked against what the
  workers wrote, and every set's files are renamed, in rank order, to `{stem}-{000000..}.tar`.
- `on_write_failed`: every temporary file, and every shard this run renamed, is removed: a job
  that fails (in a task, or in the verb's loop) leaves no file under a final name.

`build` writes a window of records at a time (one `write_datasink` each): each window's commit
continues its sets' shard numbering, and a later failure removes the earlier windows' shards too.

Shard boundaries follow the write tasks (one per input shard, or per RECORDS_PER_BLOCK build
records): a shard holds at most `samples_per_shard` samples, as in-process, and the samples are in
the same order, but a task's last shard may be smaller.
"""
from __future__ import annotations

import os
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from omni.curate.common import CurationError, ShardSink

try:
    from ray.data import Datasink
    from ray.data.block import BlockAccessor
except ImportError:
    raise CurationError("--ray needs Ray Data: pip install -e .[scale]") from None

PARTIAL = ".partial"
KEPT_BYTES = ("__key__", "__url__", "json")   # members the driver's bookkeeping reads; media stay on the worker

Item = tuple[tuple, object, object]   # (rank, raw sample | Unreadable | None, map result)


def light(value, stem: str | None):
    """A sample as the driver needs it: key, url and json; media members emptied; `__to__` the set it
    went to. Anything that is not a sample is returned as it is."""
    if not (isinstance(value, dict) and "__key__" in value):
        return value
    return {**{k: (v if k in KEPT_BYTES or not isinstance(v, bytes) else b"") for k, v in value.items()},
            "__to__": stem}


def items_of(block) -> Iterator[Item]:
    """The rows of the backend's maps as items: (e, s, p, raw, result) for shard samples (rank
    (e, s, p)), (i, result) for build records (rank (i,), the result is the sample)."""
    for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True):
        result = pickle.loads(row["result"])
        if "i" in row:
            yield (int(row["i"]),), None, result
        else:
            yield (int(row["e"]), int(row["s"]), int(row["p"])), pickle.loads(row["raw"]), result


def tag_of(rank: tuple) -> str:
    """A rank as a fixed-width name: names sort as ranks do (an unreadable row's -1 counts as 0)."""
    return "-".join(f"{max(int(x), 0):010d}" for x in rank)


class ShardDatasink(Datasink):
    """One verb run's output shard sets on Ray: what the write tasks need (folder, route, sizes) and,
    on the driver, the verb's `fold` over the light rows and its `WrittenShards` sinks."""

    def __init__(self, folder: Path, route: Callable, samples_per_shard: int = 5000, shard_bytes: float = 5e8):
        self.folder, self.route = Path(folder), route   # route: (rank, raw, result) -> stem | None
        self.samples_per_shard, self.shard_bytes = samples_per_shard, shard_bytes
        self.fold: Callable[[Iterator[Item]], None] | None = None   # driver: the verb's loop over the rows
        self.sinks: dict[str, WrittenShards] = {}                   # driver: the verb's count per set
        self.shards: Counter = Counter()                            # driver: stem -> shards renamed so far
        self.renamed: list[Path] = []                               # driver: final names given by this run

    def __getstate__(self) -> dict:   # the write tasks get the configuration, not the driver's state
        return {**self.__dict__, "fold": None, "sinks": {}, "shards": Counter(), "renamed": []}

    @property
    def partial(self) -> Path:
        return self.folder / PARTIAL

    def sink(self, stem: str) -> "WrittenShards":
        """Driver: the verb's sink for one set (counts what its loop puts there)."""
        return self.sinks.setdefault(stem, WrittenShards(self, stem))

    # ------------------------------------------------------------ write tasks
    def on_write_start(self, schema=None) -> None:
        """Driver, before the first write task: no leftovers of an earlier failed job."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def write(self, blocks: Iterable, ctx) -> dict | None:
        """One write task: its rows' samples into `{stem}~{tag}` shards, their light copies into
        `rows/{tag}.pkl`; returns {tag, counts per set} (None for a task without rows)."""
        return self.write_items(item for block in blocks for item in items_of(block))

    def write_items(self, items: Iterable[Item]) -> dict | None:
        tag, rows, counts = None, [], Counter()
        sinks: dict[str, ShardSink] = {}
        try:
            for rank, raw, result in items:
                tag = tag or tag_of(rank)
                stem = self.route(rank, raw, result)
                if stem is not None:
                    if stem not in sinks:
                        sinks[stem] = ShardSink(self.partial, f"{stem}~{tag}", self.samples_per_shard,
                                                self.shard_bytes)
                    sinks[stem].write(result if raw is None else raw)
                    counts[stem] += 1
                rows.append((rank, light(raw, stem), light(result, stem)))
        finally:
            for s in sinks.values():
                s.close()
        if tag is None:
            return None
        path = self.partial / "rows" / f"{tag}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")   # a rerun replaces the file whole
        tmp.write_bytes(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(path)
        return {"tag": tag, "counts": dict(counts)}

    # ------------------------------------------------------------ driver
    def on_write_complete(self, write_result) -> None:
        """The verb's loop over the light rows in rank order, the count check, then the renames."""
        self.commit([r for r in write_result.write_returns if r is not None])

    def commit(self, returns: list[dict]) -> None:
        returns = sorted(returns, key=lambda r: r["tag"])
        before = Counter({stem: s.count for stem, s in self.sinks.items()})
        self.fold(self.rows(returns))
        counted = Counter({stem: s.count for stem, s in self.sinks.items()}) - before
        written = sum((Counter(r["counts"]) for r in returns), Counter())
        if +counted != +written:
            raise RuntimeError(f"--ray: the workers wrote {dict(written)} samples per set, the verb counted "
                               f"{dict(counted)}; the verb's route and its loop disagree")
        for stem in sorted(written):
            if not self.shards[stem]:   # this run's first shards of the set: stale ones go
                for old in self.folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                    old.unlink()
            for f in sorted(self.partial.glob(f"{stem}~*.tar")):
                final = self.folder / f"{stem}-{self.shards[stem]:06d}.tar"
                f.rename(final)
                self.renamed.append(final)
                self.shards[stem] += 1
        shutil.rmtree(self.partial, ignore_errors=True)
        for s in self.sinks.values():
            s.bytes = sum(p.stat().st_size for p in s.shards())

    def rows(self, returns: list[dict]) -> Iterator[Item]:
        """Every task's light rows, task by task in rank order (one file in memory at a time)."""
        for r in returns:
            yield from pickle.loads((self.partial / "rows" / f"{r['tag']}.pkl").read_bytes())

    def on_write_failed(self, error: Exception) -> None:
        """Every temporary file and every shard this run renamed are removed."""
        shutil.rmtree(self.partial, ignore_errors=True)
        for f in self.renamed:
            f.unlink(missing_ok=True)
        self.renamed.clear()


class WrittenShards(ShardSink):
    """A `ShardSink` whose samples the write tasks wrote: `write` only counts (and checks the worker put
    the sample in this set); shards, urls and bytes are those `ShardDatasink.commit` renamed into place."""

    def __init__(self, datasink: ShardDatasink, stem: str):
        super().__init__(datasink.folder, stem, datasink.samples_per_shard, datasink.shard_bytes)
        self.datasink = datasink

    def write(self, sample: dict) -> None:
        if sample.get("__to__") != self.stem:
            raise RuntimeError(f"--ray: sample {sample.get('__key__')!r} was written to {sample.get('__to__')!r}, "
                               f"the verb puts it in {self.stem!r}")
        self.count += 1

    def close(self) -> None:  # nothing open here; `commit` sets the bytes
        pass

    @property
    def num_shards(self) -> int:
        return self.datasink.shards.get(self.stem, 0)
