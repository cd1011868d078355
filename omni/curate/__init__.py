"""Data curation: raw formats -> validated shards (build), dedup, reweight + quality filters, stats.

Each verb is a function over samples or shards plus at most one reduce, run in-process and
streaming (the map/reduce seams: docs/curation.md, "Beyond one machine");
`omni.cli.data.add_data_commands` registers `omni data ...`. See docs/curation.md.
"""
