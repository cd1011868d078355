"""`omni data ... --ray auto|local|ADDRESS`: the curation verbs' maps and group-bys on Ray Data.

Each verb stays the one in its own module; it takes this backend in place of its in-process
loops and gets the same sequence of per-sample results back, so what it writes (shards,
manifest, reports, rejects) is the same code on the same values:

- `map_samples`: Ray Data's WebDataset reader (`ShardSource`, its datasource with the rank of every
  sample added: one read task per input shard, members as raw bytes) then a map of the verb's
  per-sample function, fused into the read task; rows come back to the driver in manifest order
  (`preserve_order`).
- `map_records`: `build`'s conversion (`convert_record`: JSON -> validated sample, media read and
  decoded) over blocks of records, a window of records at a time.
- `dedup_removed`: signatures (the same read, mapped) -> rows keyed by digest and by LSH band key, shuffled by a
  hash of the key (Ray Data group-bys; each part groups its keys and yields edges, ray_groups.py)
  -> `components` on the edges only. No process holds every signature; the driver holds the
  duplicates' edges.

- with a `ShardWrites` (ray_write.py), both maps also write: each block's samples go to temporary
  shards on the worker that mapped them, light copies (no media) come back for the verb's
  bookkeeping, and the driver renames the shards into place once the map has finished.

A task whose worker process dies is rerun (Ray Data retries its tasks on system failures, without
limit), and its rows are delivered once: only the output of the attempt that finished is kept, and
a rerun task writes its temporary shards under the same names again (ray_write.py).
"""
from __future__ import annotations

import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice

from omni.curate.common import CurationError, Reject, Unreadable, shard_urls, unreadable_shard
from omni.curate.components import Rank, Removal, components, lsh_shape
from omni.curate.dedup import DedupConfig, Signature, Signer, signature_of
from omni.curate.ray_groups import band_rows, bucket_part, digest_rows, edges_of, exact_part
from omni.curate.ray_write import ShardWrites, light
from omni.data.manifest import DatasetEntry
from omni.errors import SampleError

try:
    import ray
    import ray.data
    from ray.data._internal.datasource.webdataset_datasource import (
        WebDatasetDatasource,
        _group_by_keys,
        _tar_file_iterator,
    )
    from ray.data._internal.util import iterate_with_retry
except ImportError:
    raise CurationError("--ray needs Ray Data: pip install -e .[scale]") from None

DAMAGE = (tarfile.TarError, ValueError, OSError, EOFError)   # what a damaged shard raises while read
RECORDS_PER_BLOCK = 256        # build: records per Ray task
RECORDS_PER_WINDOW = 1 << 16   # build: records listed on the driver at a time


@dataclass
class RayOptions:
    address: str = "auto"                       # auto | local | ray://HOST:PORT | HOST:PORT
    num_cpus: int | None = None                 # local only: CPUs of the local instance
    object_store_bytes: int | None = None       # local only: object store size
    fault_marker: str | None = None             # tests: the first task to find this file absent exits its worker


class RayBackend:
    """Connects to (or, with `local`, starts) Ray once; an already initialised Ray is reused and left
    running. As a context manager it shuts down (or disconnects from) the Ray it started."""

    def __init__(self, options: RayOptions | None = None):
        self.options = opts = options or RayOptions()
        self.owned = not ray.is_initialized()
        if self.owned:
            if opts.address == "local":
                ray.init(address="local", num_cpus=opts.num_cpus, object_store_memory=opts.object_store_bytes,
                         include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            else:
                try:
                    ray.init(address=opts.address, logging_level="WARNING", log_to_driver=False)
                except ConnectionError as e:
                    raise CurationError(f"--ray {opts.address}: no Ray cluster there ({e}); start one with "
                                        "`ray start --head` or use --ray local") from None
        logging.getLogger("ray.data").setLevel(logging.WARNING)   # not a line per dataset executed
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        self.data = ray.data

    def close(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()
        self.owned = False

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ maps
    def _samples(self, entries: list[DatasetEntry], limit: int | None = None):
        """Every sample of the entries' shards as rows (e, s, p, raw pickled), read by Ray Data."""
        urls = [url for e in entries for url in shard_urls(e)]
        if any(u.startswith("pipe:") for u in urls):
            raise CurationError("--ray reads shards with Ray Data's reader (local or shared paths, s3://, gs://, "
                                "hdfs://): a pipe: url cannot be read there; copy the shards or run without --ray")
        return self.data.read_datasource(ShardSource(entries, limit), override_num_blocks=max(1, len(set(urls))))

    def map_samples(self, entries: list[DatasetEntry], fn: Callable | None = None,
                    keep_raw: bool = True, limit: int | None = None,
                    writes: ShardWrites | None = None) -> Iterator[tuple]:
        """The same (rank, raw | Unreadable, result) sequence as `common.map_samples`, mapped on Ray;
        with `keep_raw=False` the raw sample stays on the worker (None comes back, Unreadable kept).
        A `limit` caps every shard (its entry's first `limit` samples are the same as in-process; the
        caller counts them). With `writes` the workers also write each sample where `writes.route`
        puts it, and a light copy comes back (ray_write.py)."""
        task = partial(_result_row, fn=fn, keep_raw=keep_raw or writes is not None, marker=self.options.fault_marker)
        ds = self._samples(entries, limit).map(task)
        if writes is not None:
            ds = ds.map_batches(partial(_write_samples, writes=writes), batch_size=None, batch_format="pandas")
        for row in ds.iter_rows():
            raw = pickle.loads(row["raw"])
            if writes is not None:
                writes.seen(raw)
            yield (row["e"], row["s"], row["p"]), raw, pickle.loads(row["result"])

    def map_records(self, records: Iterable[tuple], fn: Callable,
                    writes: ShardWrites | None = None) -> Iterator[tuple]:
        """(record, fn(*record)) for every record, in order, on Ray (a raised `Reject` comes back as the
        value); records are taken RECORDS_PER_WINDOW at a time, so the driver never lists them all.
        With `writes` the workers write each result where `writes.route` puts it (rank: the record's
        index) and a light copy comes back."""
        records = iter(records)
        task = partial(_record_row, fn=fn, marker=self.options.fault_marker)
        start = 0
        while window := list(islice(records, RECORDS_PER_WINDOW)):
            blocks = -(-len(window) // RECORDS_PER_BLOCK)
            ds = self.data.from_items([{"i": start + i, "record": pickle.dumps(r)} for i, r in enumerate(window)],
                                      override_num_blocks=blocks).map(task)
            if writes is not None:
                ds = ds.map_batches(partial(_write_results, writes=writes), batch_size=None, batch_format="pandas")
            for record, row in zip(window, ds.iter_rows()):
                result = pickle.loads(row["result"])
                if writes is not None:
                    writes.seen(result)
                yield record, result
            start += len(window)

    # ------------------------------------------------------------ dedup
    def dedup_removed(self, entries: list[DatasetEntry], cfg: DedupConfig) -> dict[Rank, Removal]:
        """Signatures on the workers; group-bys by digest and by band key as shuffles; components here."""
        sign = partial(_signature_rows, signer=Signer(cfg), marker=self.options.fault_marker)
        sigs = self._samples(entries).flat_map(sign).materialize()
        parts = max(1, sigs.num_blocks())
        edges = []
        if cfg.exact != "off":
            digests = sigs.flat_map(partial(digest_rows, parts=parts))
            edges += edges_of(digests.groupby("part").map_groups(exact_part, batch_format="numpy"))
        if cfg.near:
            bands, rows = lsh_shape(cfg.threshold, cfg.num_perm, cfg.lsh_params)
            banded = sigs.flat_map(partial(band_rows, bands=bands, rows=rows, parts=parts))
            edges += edges_of(banded.groupby("part").map_groups(
                partial(bucket_part, threshold=cfg.threshold, verify=cfg.verify), batch_format="numpy"))
        return components(edges)


# ---------------------------------------------------------------- worker-side functions
def _maybe_fail(marker: str | None) -> None:
    """Fault injection for the retry test: exit this worker once (the marker file says it happened)."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _result_row(row: dict, fn, keep_raw: bool, marker: str | None) -> dict:
    """fn(raw sample) (or the Reject/SampleError it raised) of one read row, as `shard_results` gives it."""
    _maybe_fail(marker)
    raw, result = pickle.loads(row["raw"]), None
    if not isinstance(raw, Unreadable) and fn is not None:
        try:
            result = fn(raw)
        except (Reject, SampleError) as e:
            result = e
    if not keep_raw and not isinstance(raw, Unreadable):
        raw = None
    return {**row, "raw": pickle.dumps(raw), "result": pickle.dumps(result)}


def _record_row(row: dict, fn, marker: str | None) -> dict:
    _maybe_fail(marker)
    try:
        result = fn(*pickle.loads(row["record"]))
    except Reject as r:
        result = r
    return {"i": row["i"], "result": pickle.dumps(result)}


def _write_samples(batch, writes: ShardWrites):
    """One block of mapped rows: each sample written where the verb's route puts it, a light copy kept."""
    rows = batch.to_dict("records")
    if not rows:
        return batch
    items = []
    for row in rows:
        raw = pickle.loads(row["raw"])
        stem = writes.route((row["e"], row["s"], row["p"]), raw, pickle.loads(row["result"]))
        items.append((stem, raw))
        if isinstance(raw, dict):
            row["raw"] = pickle.dumps(light(raw, stem))
    first = next(((r["e"], r["s"], r["p"]) for r in rows if r["p"] >= 0), (rows[0]["e"], rows[0]["s"], 0))
    writes.write_block("{:04d}-{:08d}-{:010d}".format(*first), items)
    return batch.from_records(rows, columns=list(batch.columns))


def _write_results(batch, writes: ShardWrites):
    """One block of converted records: each sample written where the verb's route puts it, a light copy kept."""
    rows = batch.to_dict("records")
    if not rows:
        return batch
    items = []
    for row in rows:
        result = pickle.loads(row["result"])
        stem = writes.route((row["i"],), result, result)
        items.append((stem, result))
        if isinstance(result, dict):
            row["result"] = pickle.dumps(light(result, stem))
    writes.write_block(f"{rows[0]['i']:012d}", items)
    return batch.from_records(rows, columns=list(batch.columns))


def _signature_rows(row: dict, signer: Signer, marker: str | None) -> list[dict]:
    _maybe_fail(marker)
    raw = pickle.loads(row["raw"])
    if isinstance(raw, Unreadable):
        return []
    try:
        sig = signature_of(signer, raw)
    except (Reject, SampleError):
        return []
    if not isinstance(sig, Signature):
        return []
    return [{"e": row["e"], "s": row["s"], "p": row["p"], "exact": (sig.exact or b"").hex(),
             "minhash": b"" if sig.minhash is None else sig.minhash.tobytes()}]


class ShardSource(WebDatasetDatasource):
    """Ray Data's WebDataset datasource (its file listing and opening, tar reader and key grouping: a
    key ends at the first dot of a member's name, as in webdataset), members kept as bytes (no
    decoder), with what the verbs need added: the rank (dataset, shard, position) of every sample,
    the first `limit` samples of a shard with a limit, and a damaged shard's samples before the
    damage, then one `Unreadable` row (`common.unreadable_shard`, the in-process reader's line)
    instead of a failed dataset."""

    def __init__(self, entries: list[DatasetEntry], limit: int | None = None):
        self.ranks: dict[str, list[tuple[int, int]]] = {}
        for di, e in enumerate(entries):
            for si, url in enumerate(shard_urls(e)):
                self.ranks.setdefault(url, []).append((di, si))
        self.urls = {u.split("://", 1)[-1]: u for u in self.ranks}   # the path Ray Data opens -> url
        self.limit = limit
        super().__init__(list(self.ranks), decoder=None)

    def _read_stream(self, stream, path: str):
        """The datasource's own steps (tar members, retried on transient I/O errors; grouped by key),
        one sample at a time, so the samples before a damaged member are kept."""
        import pandas as pd
        url = self.urls[path]
        errors: list[Exception] = []

        def members():  # a damaged member ends the shard; the sample being grouped is still given
            try:
                yield from iterate_with_retry(lambda: _tar_file_iterator(stream), "iterate tar file",
                                              match=self._data_context.retried_io_errors)
            except DAMAGE as e:
                errors.append(e)

        rows, p = [], 0
        try:
            for raw in _group_by_keys(members(), meta={"__url__": url}):
                if self.limit is not None and p >= self.limit:
                    break
                rows += [{"e": di, "s": si, "p": p, "raw": pickle.dumps(raw)} for di, si in self.ranks[url]]
                p += 1
        except DAMAGE as e:  # a key split across the tar, or a member twice
            errors.append(e)
        if errors:
            bad = pickle.dumps(unreadable_shard(url, errors[0]))
            rows += [{"e": di, "s": si, "p": -1, "raw": bad} for di, si in self.ranks[url]]
        if rows:
            yield pd.DataFrame.from_records(rows)
