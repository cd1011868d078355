"""Duplicate clusters as connected components: the dedup reduce that needs no global index.

Every sample has a *rank*, `(dataset index, shard index, position in shard)`: its place in
manifest order, known to whichever process reads its shard. Dedup is three steps over small rows:

1. exact: samples grouped by digest; each group gives star edges from its earliest member;
2. near: every MinHash signature cut into `bands` keys of `rows` values (LSH); samples sharing a
   band key are candidates; within one bucket every pair of distinct signatures whose estimated
   Jaccard passes the threshold (or every pair, with `verify` off) is an edge;
3. connected components of all edges; the earliest rank of a component is kept, every other
   member removed as a duplicate of it.

Steps 1 and 2 are group-bys (a dict in-process, a shuffle on Ray: no process holds every
signature); step 3 holds only the edges, i.e. the duplicates. Both paths call these functions,
so they keep the same samples. Why components and not "compare with kept samples":
docs/decisions.md.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import MinHashLSH

Rank = tuple[int, int, int]
Edge = tuple[Rank, Rank, float, str]      # (earlier, later, similarity, "exact" | "near")


def lsh_shape(threshold: float, num_perm: int, params: tuple[int, int] | None) -> tuple[int, int]:
    """(bands, rows): the given ones, or datasketch's optimum for the threshold (its own choice)."""
    if params:
        return params
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(minhash: np.ndarray, bands: int, rows: int) -> list[str]:
    """One bucket key per band: the band number and its `rows` hash values (hex, so any shuffle sorts it)."""
    return [f"{b:04x}" + minhash[b * rows:(b + 1) * rows].tobytes().hex() for b in range(bands)]


def exact_edges(ranks: Iterable[Rank]) -> list[Edge]:
    """Samples with one digest: an edge from the earliest to each later one."""
    first, *rest = sorted(ranks)
    return [(first, r, 1.0, "exact") for r in rest]


def bucket_edges(members: Iterable[tuple[Rank, np.ndarray]], threshold: float, verify: bool) -> list[Edge]:
    """Candidate pairs of one LSH bucket -> edges. Identical signatures join their earliest holder
    (similarity 1.0) without a pairwise check; distinct ones are compared pairwise."""
    firsts: dict[bytes, Rank] = {}
    distinct: list[tuple[Rank, np.ndarray]] = []
    edges: list[Edge] = []
    for rank, sig in sorted(members, key=lambda m: m[0]):
        key = sig.tobytes()
        if key in firsts:
            edges.append((firsts[key], rank, 1.0, "near"))
        else:
            firsts[key] = rank
            distinct.append((rank, sig))
    if len(distinct) > 1:
        sigs = np.stack([s for _, s in distinct])
        for i in range(len(distinct) - 1):
            sims = (sigs[i + 1:] == sigs[i]).mean(axis=1)
            for j in np.flatnonzero(sims >= threshold) if verify else range(len(sims)):
                edges.append((distinct[i][0], distinct[i + 1 + j][0], float(sims[j]), "near"))
    return edges


@dataclass(frozen=True)
class Removal:
    kept: Rank           # the earliest member of the component
    kind: str            # "exact": shares a digest with an earlier sample; otherwise "near"
    similarity: float    # the highest similarity of the edges that touch it (1.0 for exact)


def components(edges: Iterable[Edge]) -> dict[Rank, Removal]:
    """Union-find over the edges: every member of a component but its earliest -> its Removal."""
    parent: dict[Rank, Rank] = {}
    best: dict[Rank, float] = {}
    exact: set[Rank] = set()

    def root(x: Rank) -> Rank:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, sim, kind in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)      # the root is always the earliest rank
        for x in (a, b):
            best[x] = max(best.get(x, 0.0), sim)
        if kind == "exact":
            exact.add(b)
    out = {}
    for x in parent:
        r = root(x)
        if r != x:
            out[x] = Removal(r, "exact" if x in exact else "near", 1.0 if x in exact else best[x])
    return out
