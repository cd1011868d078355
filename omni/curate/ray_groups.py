"""Ray Data functions of the dedup shuffles: rows keyed by digest or LSH band bucket, and one
partition of them -> edge rows.

Rows are shuffled by `part` (a hash of the key, as many parts as signature blocks), and each part
groups its rows by key in a dict: one function call per part, not per key (most band buckets hold
one sample, and a call per bucket costs more than the bucket). A part holds 1/parts of the rows,
so a worker's memory stays flat as the input grows by more shards.

Apart from `ray_backend` so that the shuffle's workers import only numpy and components.py
(the verbs' modules pull in the media decoders).
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from omni.curate.components import Edge, Rank, band_keys, bucket_edges, exact_edges


def _part(key: str, parts: int) -> int:
    return zlib.crc32(key.encode()) % parts


def digest_rows(row: dict, parts: int) -> list[dict]:
    """One signature row -> its digest row (none without a digest)."""
    if not row["exact"]:
        return []
    return [{"part": _part(row["exact"], parts), "key": row["exact"], "e": row["e"], "s": row["s"], "p": row["p"]}]


def band_rows(row: dict, bands: int, rows: int, parts: int) -> list[dict]:
    """One signature row -> one row per LSH band, keyed by the band's bucket (none without a signature)."""
    if not row["minhash"]:
        return []
    sig = np.frombuffer(row["minhash"], np.uint32)
    return [{"part": _part(k, parts), "key": k, "e": row["e"], "s": row["s"], "p": row["p"], "minhash": row["minhash"]}
            for k in band_keys(sig, bands, rows)]


def _ranks(batch) -> list[Rank]:
    return [(int(e), int(s), int(p)) for e, s, p in zip(batch["e"], batch["s"], batch["p"])]


def _edge_columns(edges: list[Edge]) -> dict[str, np.ndarray]:
    cols = list(zip(*[(*a, *b, sim, kind) for a, b, sim, kind in edges])) or [()] * 8
    return {**{name: np.asarray(c, np.int64) for name, c in zip(("ae", "as", "ap", "be", "bs", "bp"), cols)},
            "sim": np.asarray(cols[6], np.float64), "kind": np.asarray(cols[7], dtype=object)}


def exact_part(batch) -> dict[str, np.ndarray]:
    """Digest rows of one part -> exact edges of every digest shared by more than one sample."""
    groups: dict[str, list[Rank]] = defaultdict(list)
    for key, rank in zip(batch["key"], _ranks(batch)):
        groups[key].append(rank)
    return _edge_columns([e for ranks in groups.values() if len(ranks) > 1 for e in exact_edges(ranks)])


def bucket_part(batch, threshold: float, verify: bool) -> dict[str, np.ndarray]:
    """Band rows of one part -> near edges of every bucket holding more than one sample."""
    groups: dict[str, list] = defaultdict(list)
    for key, rank, m in zip(batch["key"], _ranks(batch), batch["minhash"]):
        groups[key].append((rank, m))
    edges = []
    for members in groups.values():
        if len(members) > 1:
            edges += bucket_edges([(r, np.frombuffer(m, np.uint32)) for r, m in members], threshold, verify)
    return _edge_columns(edges)


def edges_of(ds) -> Iterator[Edge]:
    """Edge rows of a dataset back as `components.Edge` tuples, streamed (the driver's union-find
    takes them one at a time and holds only the duplicates' ranks, not the edges)."""
    for r in ds.iter_rows():
        yield ((int(r["ae"]), int(r["as"]), int(r["ap"])), (int(r["be"]), int(r["bs"]), int(r["bp"])),
               float(r["sim"]), str(r["kind"]))
