"""Data curation: raw formats -> validated shards (build), dedup, reweight + quality filters, stats.

Each verb is a function over samples or shards plus at most one reduce (ARCHITECTURE §7), run
in-process and streaming; `omni.curate.cli.add_data_commands` registers `omni data ...`.
See docs/curation.md.
"""
