"""Curation throughput: samples/s of `omni data build` and `omni data dedup` on generated input.

    python bench/curation_throughput.py                 # 3000 LLaVA records + 20000 text samples
    python bench/curation_throughput.py --n 1000 --text-n 5000

Input, made here: N LLaVA-style records (80 % one 96x96 JPEG, 10 % a 1 s 16 kHz WAV, 10 % text
only; conversations of ~60-120 words; 5 % exact and 10 % near-duplicate records), written as a
JSON array plus media files. Measured, single process:
  build          convert + validate (media decoded) + shard            (--format llava)
  build --no-decode-check                                               (existence/extension only)
  dedup          exact + MinHash LSH over the built shards (defaults)
  dedup text     the same over text-only shards of --text-n samples (no media hashing)
and the in-process reduce's memory per sample (tracemalloc over `removed_in_memory`: the digest
and LSH band dicts of every signature; timed separately; the Ray path shuffles them instead).
Prints one line per measurement; the numbers go to docs/benchmarks.md with this command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import tracemalloc
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from omni.curate.build import BuildConfig, build
from omni.curate.common import ShardSink, write_manifest
from omni.curate.dedup import DedupConfig, Signer, dedup, removed_in_memory


def words(rng, vocab, n):
    return [vocab[j] for j in rng.integers(0, len(vocab), n)]


def edit(ws, rng, vocab, n):
    ws = list(ws)
    for _ in range(n):
        ws[int(rng.integers(len(ws)))] = vocab[rng.integers(len(vocab))]
    return ws


def make_llava(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(5000)]
    (root / "media").mkdir(parents=True, exist_ok=True)
    records = []
    t = np.arange(16000) / 16000
    for i in range(n):
        r = rng.random()
        if i > 20 and r < 0.05:  # exact copy of an earlier record
            records.append(dict(records[int(rng.integers(len(records)))], id=f"r{i}"))
            continue
        if i > 20 and r < 0.15:  # near copy: same media, 2 words changed
            src = records[int(rng.integers(len(records)))]
            q, a = (c["value"] for c in src["conversations"])
            a = " ".join(edit(a.split(), rng, vocab, 2))
            records.append({**src, "id": f"r{i}", "conversations": [{"from": "human", "value": q},
                                                                      {"from": "gpt", "value": a}]})
            continue
        q = " ".join(words(rng, vocab, int(rng.integers(10, 25)))) + "?"
        a = " ".join(words(rng, vocab, int(rng.integers(50, 100)))) + "."
        rec = {"id": f"r{i}"}
        kind = rng.random()
        if kind < 0.8:
            name = f"media/{i:06d}.jpg"
            pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 12, (96, 96, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name, quality=85)
            rec["image"], q = name, "<image>\n" + q
        elif kind < 0.9:
            name = f"media/{i:06d}.wav"
            pcm = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 900) * t) * 32767).astype("<i2")
            with wave.open(str(root / name), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes(pcm.tobytes())
            rec["audio"], q = name, "<audio>\n" + q
        rec["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append(rec)
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def make_text_shards(root: Path, n: int, seed: int = 1, per_shard: int = 5000) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(5000)]
    sink = ShardSink(root / "text_in", "text-train", per_shard)
    docs = []
    for i in range(n):
        if docs and rng.random() < 0.1:
            ws = edit(docs[int(rng.integers(len(docs)))], rng, vocab, 2)
        else:
            ws = words(rng, vocab, int(rng.integers(60, 120)))
            docs.append(ws)
        meta = {"messages": [{"role": "user", "content": " ".join(ws[:15])},
                             {"role": "assistant", "content": " ".join(ws[15:])}], "task": "chat", "source": "bench"}
        sink.write({"__key__": f"t{i:07d}", "json": json.dumps(meta).encode()})
    sink.close()
    entry = {"name": "text", "split": "train", "urls": sink.urls(root), "num_samples": sink.count, "weight": 1.0,
             "modalities": [], "task": "chat"}
    return write_manifest(root / "text_manifest.yaml", "text", [entry], replace=True)


def reduce_memory(manifest: Path, n: int) -> tuple[float, int]:
    """Peak bytes per sample of the in-process reduce (digest and band-bucket dicts, then components)."""
    from omni.curate.common import map_samples
    from omni.data.loader import read_meta
    from omni.data.manifest import load_manifest

    cfg = DedupConfig()
    signer = Signer(cfg)
    sigs = []
    for rank, raw, _ in map_samples(load_manifest(manifest).datasets[:1]):
        sigs.append((rank, signer(read_meta(raw), raw)))
        if len(sigs) >= n:
            break
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    removed_in_memory(sigs, cfg)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak / len(sigs), len(sigs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="LLaVA records for build + dedup")
    ap.add_argument("--text-n", type=int, default=20000, help="text-only samples for dedup")
    ap.add_argument("--keep", help="write everything under this folder and keep it (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="omni-curation-bench-"))
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"python {platform.python_version()}; single process")
        t = time.perf_counter()
        src = make_llava(root, args.n)
        print(f"generated {args.n} LLaVA records in {time.perf_counter() - t:.1f} s (not timed below)")

        rows = []
        for check in (True, False):
            out = root / ("built" if check else "built_nodecode")
            r = build(BuildConfig(format="llava", inputs=[str(src)], out_dir=str(out), name="bench",
                                  media_root=str(root), check_media=check, samples_per_shard=1000), progress=False)
            rows.append((f"build llava{'' if check else ' --no-decode-check'}", r.written + r.rejected,
                         r.seconds, f"{r.written} written, {r.rejected} rejected, {r.shards} shards"))
        d = dedup(root / "built" / "manifest.yaml", root / "dedup", DedupConfig(), progress=False)
        c = d.counts[0]
        rows.append(("dedup (built llava shards)", d.total_input, d.seconds,
                     f"{c.exact_removed} exact + {c.near_removed} near removed, {c.kept} kept"))
        tm = make_text_shards(root, args.text_n)
        d = dedup(tm, root / "dedup_text", DedupConfig(), progress=False)
        c = d.counts[0]
        rows.append(("dedup (text-only shards)", d.total_input, d.seconds,
                     f"{c.exact_removed} exact + {c.near_removed} near removed, {c.kept} kept"))
        d = dedup(tm, root / "dedup_text_exact", DedupConfig(near=False), progress=False, dry_run=True)
        rows.append(("dedup --no-near --dry-run (text)", d.total_input, d.seconds, "exact digests only"))
        print(f"\n{'step':<36} {'samples':>8} {'seconds':>8} {'samples/s':>10}  notes")
        for name, n, s, note in rows:
            print(f"{name:<36} {n:>8} {s:>8.2f} {n / s:>10.0f}  {note}")
        per, n = reduce_memory(tm, min(args.text_n, 20000))
        print(f"\nin-process dedup reduce (defaults: 128 perms, threshold 0.7 -> 14 bands x 9 rows): "
              f"{per:.0f} bytes per sample at its peak ({n} samples; tracemalloc)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
