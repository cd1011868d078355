"""`omni data ... --ray auto|local|ADDRESS`: the curation verbs' maps and group-bys on Ray Data.

Each verb stays the one in its own module; it takes this backend in place of its in-process
loops and gets the same sequence of per-sample results back, so what it writes (shards,
manifest, reports, rejects) is the same code on the same values:

- `map_samples`: Ray Data's WebDataset reader (`ShardSource`, its datasource with the rank of every
  sample added: one read task per input shard, members as raw bytes) then a map of the verb's
  per-sample function, fused into the read task; rows come back to the driver in manifest order
  (`preserve_order`). For the verbs' passes that write nothing (stats, dedup's signatures and
  dry runs, reweight's cluster fit).
- `write_samples`: the same read and map ending in Ray Data's write API, `write_datasink` with a
  `ShardDatasink` (ray_write.py): the write tasks write the shards, the verb's loop folds the
  light rows (no media) in manifest order on the driver, then the shards are renamed into place.
- `write_records`: `build`'s conversion (`convert_record`: JSON -> validated sample, media read and
  decoded) over blocks of records, written the same way, a window of records at a time.
- `dedup_removed`: signatures (the same read, mapped) -> rows keyed by digest and by LSH band key, shuffled by a
  hash of the key (Ray Data group-bys; each part groups its keys and yields edges, ray_groups.py)
  -> `components` on the edges, streamed. No process holds every signature; the driver holds the
  duplicates' ranks (union-find), not their edges.

A task whose worker process dies is rerun (Ray Data retries its tasks on system failures, without
limit), and its rows are delivered once: only the output of the attempt that finished is kept, and
a rerun write task writes its temporary shards and rows file under the same names again (ray_write.py).
"""
from __future__ import annotations

import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import chain, islice

import numpy as np

from omni.curate.common import CurationError, Reject, Unreadable, shard_urls, unreadable_shard
from omni.curate.components import Rank, Removal, components, lsh_shape
from omni.curate.dedup import DedupConfig, Signature, Signer, signature_of
from omni.curate.ray_groups import band_rows, bucket_part, digest_rows, edges_of, exact_part
from omni.curate.ray_write import ShardDatasink
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
                    keep_raw: bool = True, limit: int | None = None) -> Iterator[tuple]:
        """The same (rank, raw | Unreadable, result) sequence as `common.map_samples`, mapped on Ray;
        with `keep_raw=False` the raw sample stays on the worker (None comes back, Unreadable kept).
        A `limit` caps every shard (its entry's first `limit` samples are the same as in-process; the
        caller counts them)."""
        task = partial(_result_row, fn=fn, keep_raw=keep_raw, marker=self.options.fault_marker)
        for row in self._samples(entries, limit).map(task).iter_rows():
            yield (row["e"], row["s"], row["p"]), pickle.loads(row["raw"]), pickle.loads(row["result"])

    def datasink(self, folder, route: Callable, samples_per_shard: int, shard_bytes: float) -> ShardDatasink:
        """The verbs' output sets on Ray (ray_write.py): `route` (rank, raw, result) -> stem | None runs
        on the write tasks; the verb's loop counts through `datasink.sink(stem)`."""
        return ShardDatasink(folder, route, samples_per_shard, shard_bytes)

    def write_samples(self, entries: list[DatasetEntry], sink: ShardDatasink, fold: Callable,
                      fn: Callable | None = None, marked: Iterable[Rank] | None = None) -> None:
        """`map_samples` ending in Ray Data's write: the write tasks write every sample where
        `sink.route` puts it, then `fold` (the verb's loop) gets the (rank, light raw, result)
        sequence on the driver, in manifest order, before the shards are renamed (ray_write.py).
        With `marked` (dedup's removed ranks) the result is whether the sample's rank is marked:
        each shard's marked positions go to the object store apart, and a task fetches its own
        shard's only, so what a task holds does not grow with the corpus's duplicates."""
        sink.fold = fold
        shards = None
        if marked is not None:
            positions: dict[tuple[int, int], list[int]] = {}
            for e, s, p in marked:
                positions.setdefault((e, s), []).append(p)
            shards = {k: ray.put(np.asarray(sorted(v), np.int64)) for k, v in positions.items()}
        task = partial(_result_row, fn=fn, keep_raw=True, marker=self.options.fault_marker, marked=shards)
        self._samples(entries).map(task).write_datasink(sink)

    def write_records(self, records: Iterable[tuple], fn: Callable, sink: ShardDatasink, fold: Callable) -> None:
        """fn(*record) for every record on Ray (a raised `Reject` is the value), each resulting sample
        written where `sink.route` puts it; `fold` gets (record, light result) in order. Records are
        taken RECORDS_PER_WINDOW at a time (one write each), so the driver never lists them all."""
        records = iter(records)
        task = partial(_record_row, fn=fn, marker=self.options.fault_marker)
        start = 0
        while window := list(islice(records, RECORDS_PER_WINDOW)):
            blocks = -(-len(window) // RECORDS_PER_BLOCK)
            sink.fold = partial(_fold_window, fold=fold, window=window)
            self.data.from_items([{"i": start + i, "record": pickle.dumps(r)} for i, r in enumerate(window)],
                                 override_num_blocks=blocks).map(task).write_datasink(sink)
            start += len(window)

    # ------------------------------------------------------------ dedup
    def dedup_removed(self, entries: list[DatasetEntry], cfg: DedupConfig) -> dict[Rank, Removal]:
        """Signatures on the workers; group-bys by digest and by band key as shuffles; components here."""
        sign = partial(_signature_rows, signer=Signer(cfg), marker=self.options.fault_marker)
        sigs = self._samples(entries).flat_map(sign).materialize()
        parts = max(1, sigs.num_blocks())
        edges = []   # edge streams, taken by `components` one edge at a time
        if cfg.exact != "off":
            digests = sigs.flat_map(partial(digest_rows, parts=parts))
            edges.append(edges_of(digests.groupby("part").map_groups(exact_part, batch_format="numpy")))
        if cfg.near:
            bands, rows = lsh_shape(cfg.threshold, cfg.num_perm, cfg.lsh_params)
            banded = sigs.flat_map(partial(band_rows, bands=bands, rows=rows, parts=parts))
            edges.append(edges_of(banded.groupby("part").map_groups(
                partial(bucket_part, threshold=cfg.threshold, verify=cfg.verify), batch_format="numpy")))
        return components(chain.from_iterable(edges))


# ---------------------------------------------------------------- worker-side functions
def _maybe_fail(marker: str | None) -> None:
    """Fault injection for the retry test: exit this worker once (the marker file says it happened)."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


@lru_cache(maxsize=2)
def _positions(ref) -> np.ndarray:
    """One shard's marked positions (sorted), fetched once per task and shard."""
    return ray.get(ref)


def _is_marked(shards: dict, e: int, s: int, p: int) -> bool:
    ref = shards.get((e, s))
    if ref is None:
        return False
    found = _positions(ref)
    i = int(np.searchsorted(found, p))
    return i < len(found) and int(found[i]) == p


def _result_row(row: dict, fn, keep_raw: bool, marker: str | None, marked: dict | None = None) -> dict:
    """fn(raw sample) (or the Reject/SampleError it raised) of one read row, as `shard_results` gives
    it; with `marked` (shard -> object ref of its marked positions), whether the rank is marked."""
    _maybe_fail(marker)
    raw, result = pickle.loads(row["raw"]), None
    if marked is not None:
        result = _is_marked(marked, row["e"], row["s"], row["p"])
    elif not isinstance(raw, Unreadable) and fn is not None:
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


def _fold_window(items, fold: Callable, window: list) -> None:
    """The verb's fold over one window of records: (record, light result) in record order."""
    fold((record, result) for record, (_, _, result) in zip(window, items))


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
