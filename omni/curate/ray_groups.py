"""Ray Data group functions of the dedup shuffle: LSH band rows, and one group -> edge rows.

Apart from `ray_backend` so that the shuffle's workers import only numpy, pandas and components.py
(the verbs' modules pull in the media decoders).
"""
from __future__ import annotations

import numpy as np

from omni.curate.components import Rank, band_keys, bucket_edges, exact_edges


def band_rows(row: dict, bands: int, rows: int) -> list[dict]:
    """One signature row -> one row per LSH band, keyed by the band's bucket."""
    sig = np.frombuffer(row["minhash"], np.uint32)
    return [{"band": k, "e": row["e"], "s": row["s"], "p": row["p"], "minhash": row["minhash"]}
            for k in band_keys(sig, bands, rows)]


_EDGE_COLUMNS = ("ae", "as", "ap", "be", "bs", "bp", "sim", "kind")


def _edge_frame(edges):
    import pandas as pd
    frame = pd.DataFrame([(*a, *b, sim, kind) for a, b, sim, kind in edges], columns=list(_EDGE_COLUMNS))
    return frame.astype({**{c: "int64" for c in _EDGE_COLUMNS[:6]}, "sim": "float64", "kind": "str"})


def _ranks(group) -> list[Rank]:
    return [(int(e), int(s), int(p)) for e, s, p in zip(group["e"], group["s"], group["p"])]


def exact_group(group):
    """The samples of one digest -> exact edges."""
    return _edge_frame(exact_edges(_ranks(group)) if len(group) > 1 else [])


def bucket_group(group, threshold: float, verify: bool):
    """The samples of one LSH bucket -> near edges."""
    if len(group) < 2:
        return _edge_frame([])
    members = [(r, np.frombuffer(m, np.uint32)) for r, m in zip(_ranks(group), group["minhash"])]
    return _edge_frame(bucket_edges(members, threshold, verify))


def edges_of(ds) -> list:
    """Edge rows of a dataset back as `components.Edge` tuples."""
    return [((int(r["ae"]), int(r["as"]), int(r["ap"])), (int(r["be"]), int(r["bs"]), int(r["bp"])),
             float(r["sim"]), str(r["kind"])) for r in ds.iter_rows()]
