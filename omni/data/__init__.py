"""omni.data: samples and records, and the streams a stage trains on.

    manifest.py  dataset manifests (WebDataset shard sets with sizes, weights, modalities)
    loader.py    sample members decoded (`decode_media`, `decode_sample`), bad samples counted
    records.py   chat / preference records from JSONL, JSON or WebDataset, and their examples
    stream.py    the one `Stream` interface; in-memory records and the sample-partitioned mixture
    sharded.py   the shard-partitioned mixture (decode workers)
    training.py  a stage's `data:` -> its records, held-out records and training Stream
    packing.py   a micro-batch's samples in one padding-free row (`batch.tokens_per_pack` > 0)
    config.py    the `data:` section of a stage config
    synth.py     the tiny synthetic multimodal corpus
"""
