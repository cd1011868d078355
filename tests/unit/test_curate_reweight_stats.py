"""`omni data reweight` (quality filters, group weights the mixture sampler honours) and `omni data stats`."""
from __future__ import annotations

import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_curate_build import write_image, write_mp4, write_wav

from omni.curate.common import CurationError, Reject, ShardSink, write_manifest
from omni.curate.reweight import (
    QualityConfig,
    Unit,
    mixture_weights,
    parse_boosts,
    quality_check,
    repetition_ratio,
    reweight,
)
from omni.curate.stats import DatasetStats, TokenCounter, sample_stats, stats
from omni.data.loader import SkipCounter
from omni.data.manifest import load_manifest
from omni.data.stream import mixture_samples
from omni.data.tar_index import load


def msgs(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def sample(key, user, reply, source="web", **extra):
    meta = {"messages": msgs(user, reply), "task": "chat", "source": source, **extra.pop("meta", {})}
    return {"__key__": key, "json": json.dumps(meta).encode(), **extra}


def write_entry(root, name, samples, weight=1.0, modalities=(), per_shard=40):
    sink = ShardSink(root / "in", f"{name}-train", per_shard)
    for s in samples:
        sink.write(s)
    sink.close()
    return {"name": name, "split": "train", "urls": sink.urls(root), "num_samples": sink.count,
            "weight": weight, "modalities": list(modalities), "task": "chat"}


def entry_samples(entry):
    return list(wds.DataPipeline(wds.SimpleShardList(entry.urls), wds.tarfile_to_samples()))


# ---------------------------------------------------------------- quality filters
@pytest.mark.parametrize("messages, cfg, code", [
    (msgs("What is the capital of France?", "Paris is the capital."), QualityConfig(), None),
    (msgs("hi", "yo"), QualityConfig(min_words=5), "too_short"),
    (msgs("word " * 30, "more words"), QualityConfig(max_words=10, max_repetition=None), "too_long"),
    (msgs("<image> describe", " <image> "), QualityConfig(), "short_reply"),
    (msgs("Tell me a deal.", "buy now " * 20), QualityConfig(), "repetitive"),
    (msgs("Привет, как дела?", "Хорошо, спасибо."), QualityConfig(scripts=["latin"]), "charset"),
    (msgs("Привет, как дела?", "Хорошо, спасибо."), QualityConfig(scripts=["latin", "cyrillic"]), None),
    (msgs("これは何ですか", "猫です。a cat"), QualityConfig(scripts=["latin", "cjk"]), None),
    (msgs("hello \ufffd\ufffd world", "ok fine"), QualityConfig(), "bad_chars"),
])
def test_quality_filters(messages, cfg, code):
    if code is None:
        quality_check(messages, cfg)
    else:
        with pytest.raises(Reject) as e:
            quality_check(messages, cfg)
        assert e.value.code == code


def test_repetition_ratio_and_bad_options():
    assert repetition_ratio("a b c a b c a b c".split()) == pytest.approx(1 - 3 / 7)
    assert repetition_ratio("a b".split()) == 0.0
    with pytest.raises(CurationError, match="klingon"):
        QualityConfig(scripts=["klingon"])
    with pytest.raises(CurationError, match="must be > 0"):
        parse_boosts(["x=0"])
    with pytest.raises(CurationError, match="GROUP=FACTOR"):
        parse_boosts(["x"])


# ---------------------------------------------------------------- weights
def test_mixture_weight_formula():
    def units():
        return [Unit("d1", "g1", 100), Unit("d1", "g2", 25), Unit("d2", "g3", 16, base_weight=2.0)]

    w = {u.group: u.weight for u in mixture_weights(units(), "source", 0.5, {})}
    assert w == pytest.approx({"g1": 10 / 15, "g2": 5 / 15, "g3": 2.0})  # a dataset keeps its mass
    assert [u.weight for u in mixture_weights(units(), "source", 1.0, {})][:2] == pytest.approx([0.8, 0.2])
    assert [u.weight for u in mixture_weights(units(), "source", 0.0, {})][:2] == pytest.approx([0.5, 0.5])
    w = {u.group: u.weight for u in mixture_weights(units(), "source", 0.5, {"g2": 3, "d2/g3": 0.5})}
    assert w == pytest.approx({"g1": 10 / 15, "g2": 1.0, "g3": 1.0})
    ds = [Unit("d1", "d1", 100), Unit("d2", "d2", 25)]
    assert [u.weight for u in mixture_weights(ds, "dataset", 0.5, {})] == pytest.approx([10 / 7.5, 5 / 7.5])
    with pytest.raises(CurationError, match=r"--boost \['d1'\]: no such group; groups are \['d1/g1', 'd1/g2'"):
        mixture_weights(units(), "source", 0.5, {"d1": 2.0})


# ---------------------------------------------------------------- the verb, end to end
@pytest.fixture(scope="module")
def web_corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]

    def text(n):
        return " ".join(words[j] for j in rng.integers(0, len(words), n))

    web = [sample(f"f{i:03d}", text(12), text(20), "forum") for i in range(120)]
    web += [sample(f"t{i:03d}", text(12), text(40), "textbook") for i in range(20)]
    web += [sample(f"r{i:03d}", "Say it.", "again and again " * 10, "forum") for i in range(5)]
    web += [sample(f"c{i:03d}", "Привет, как дела сегодня?", "Хорошо, спасибо большое.", "forum") for i in range(3)]
    qa = [sample(f"q{i:03d}", text(8), text(5), "qa") for i in range(30)]
    root = tmp_path_factory.mktemp("rw")
    entries = [write_entry(root, "web", web), write_entry(root, "qa", qa, weight=2.0)]
    return write_manifest(root / "manifest.yaml", "rw", entries, replace=True)


def test_reweight_by_source_filters_and_the_sampler_honours_weights(web_corpus, tmp_path):
    from omni.curate.reweight import format_result

    result = reweight(web_corpus, tmp_path, by="source", alpha=0.5, boosts={"textbook": 2.0},
                      quality=QualityConfig(scripts=["latin"]), progress=False)
    print("\n" + format_result(result))
    assert result.rejected == {"web": {"repetitive": 5, "charset": 3}}
    rows = [json.loads(line) for line in result.rejects_file.read_text().splitlines()]
    assert sorted(r["key"][0] for r in rows) == ["c"] * 3 + ["r"] * 5 and all(r["where"] for r in rows)
    m = load_manifest(result.manifest)
    entries = {e.name: e for e in m.datasets}
    z = math.sqrt(120) + math.sqrt(20)
    expected = {"web-forum": math.sqrt(120) / z, "web-textbook": 2 * math.sqrt(20) / z, "qa-qa": 2.0}
    assert {n: e.weight for n, e in entries.items()} == pytest.approx(expected, rel=1e-5)
    assert {n: e.num_samples for n, e in entries.items()} == {"web-forum": 120, "web-textbook": 20, "qa-qa": 30}
    for name, e in entries.items():
        assert {json.loads(s["json"])["source"] for s in entry_samples(e)} == {name.split("-")[1]}
    # the trainer's own mixture sampler draws entries in proportion to the written weights
    order = list(entries.values())
    stream = mixture_samples(order, [e.weight for e in order], seed=0, shuffle_buffer=8, handler=SkipCounter().handler)
    drawn = Counter(json.loads(load(next(stream))["json"])["source"] for _ in range(3000))
    total = sum(expected.values())
    for name, w in expected.items():
        assert drawn[name.split("-")[1]] / 3000 == pytest.approx(w / total, abs=0.03)


def test_reweight_by_cluster_finds_topics(tmp_path):
    rng = np.random.default_rng(1)
    topics = {"cooking": 90, "astronomy": 30, "football": 12}
    vocab = {t: [f"{t[:3]}{i}" for i in range(60)] for t in topics}
    shared = [f"the{i}" for i in range(20)]  # common words every topic uses

    def text(t, n):
        return " ".join(vocab[t][j] if rng.random() < 0.6 else shared[j % 20]
                        for j in rng.integers(0, 60, n))

    samples = [sample(f"{t}{i:03d}", text(t, 15), text(t, 25)) for t in topics for i in range(topics[t])]
    rng.shuffle(samples)
    manifest = write_manifest(tmp_path / "manifest.yaml", "c", [write_entry(tmp_path, "mix", samples)], replace=True)
    result = reweight(manifest, tmp_path / "out", by="cluster", clusters=3, alpha=0.0, progress=False)
    sizes, purity = [], []
    for e in load_manifest(result.manifest).datasets:
        keys = Counter(s["__key__"].rstrip("0123456789") for s in entry_samples(e))
        sizes.append(e.num_samples)
        purity.append(len(keys) == 1)
        assert e.weight == pytest.approx(1 / 3)  # alpha 0: every cluster the same share
    assert sorted(sizes) == sorted(topics.values()) and all(purity)


def test_reweight_json_field_and_group_limit(web_corpus, tmp_path):
    result = reweight(web_corpus, tmp_path, by="json:source", alpha=1.0, progress=False, dry_run=True)
    assert {(u.dataset, u.group): u.count for u in result.units} == {
        ("web", "forum"): 123, ("web", "textbook"): 20, ("qa", "qa"): 30}
    assert result.manifest is None and not (tmp_path / "shards").exists()
    with pytest.raises(CurationError, match=r"dataset web: more than 1 groups by 'json:source' \(e.g. \['forum'"):
        reweight(web_corpus, tmp_path, by="json:source", max_groups=1, progress=False, dry_run=True)
    with pytest.raises(CurationError, match="--by 'colour'"):
        reweight(web_corpus, tmp_path, by="colour", progress=False)


# ---------------------------------------------------------------- stats
def png_bytes(size=(40, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    img = (write_image(root / "i.jpg")).read_bytes()
    mp4 = write_mp4(root / "v.mp4", frames=8, fps=4).read_bytes()        # 2 s -> 2 frames at 1 fps
    wav = write_wav(root / "a.wav", seconds=1.5).read_bytes()           # 24000 samples
    mixed = [
        sample("img", "<image> What colour is this card?", "Red.", jpg=img),
        sample("vid", "<video> What happens?", "It fades to grey.", mp4=mp4),
        sample("aud", "<audio> Transcribe.", "a tone", wav=wav),
        sample("both", "<image> <audio> Match?", "Yes they match.", jpg=img, wav=wav),
        sample("txt", "one two three", "four five"),
        sample("bad", "<image> ?", "x", png=b"not a png"),
    ]
    text = [sample(f"t{i}", "word " * (i + 1), "reply " * (2 * i + 1)) for i in range(20)]
    entries = [write_entry(root, "mixed", mixed, modalities=["image", "video", "audio"]),
               write_entry(root, "text", text)]
    return write_manifest(root / "manifest.yaml", "s", entries, replace=True)


def test_stats_media_token_arithmetic_and_outputs(media_corpus, tmp_path):
    result = stats(media_corpus, tmp_path, preset="tiny", progress=False)
    print("\n" + result.table)
    data = json.loads(result.json_file.read_text())
    mixed, text = data["datasets"]
    assert (mixed["samples"], mixed["bad"], text["samples"]) == (5, 1, 20)
    assert mixed["modality_mix"] == {"image": 1, "video": 1, "audio": 1, "image+audio": 1, "text": 1}
    assert mixed["media_files"] == {"image": 2, "video": 1, "audio": 2}
    # tiny preset: 32-px tile -> 16 tokens; video 2 frames x 16; audio 1 s window 13 + 0.5 s 7
    image, video, audio = 16, 32, 13 + 7
    assert mixed["tokens"]["media"]["sum"] == 2 * image + video + 2 * audio
    assert mixed["tokens"]["media"]["max"] == image + audio
    words = [6, 6, 3, 4, 5]  # whitespace words per sample, placeholders removed
    assert mixed["tokens"]["text"]["sum"] == sum(words)
    assert text["tokens"]["text"]["sum"] == sum(3 * i + 2 for i in range(20))
    # totals 2, 5, ..., 59: the median 29 read from its log bin [29, 32): within the documented 9 %
    assert 29 <= text["tokens"]["total"]["p50"] <= 29 * 1.09 and text["tokens"]["total"]["max"] == 59
    assert "| mixed | train | 5 | 1 | " in result.table_file.read_text()  # 5 good + 1 bad = manifest count
    with Image.open(result.png_file) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_stats_arithmetic_matches_the_model_and_its_tokenizer(media_corpus, tiny_model, tmp_path):
    """With a model folder, text tokens come from its chat template; media tokens from its projectors."""
    from encoders import load_audio, sample_frame_indices

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path / "m", tokenizer)
    counter = TokenCounter.from_model_dir(tmp_path / "m")
    wav = write_wav(tmp_path / "x.wav", seconds=2.25).read_bytes()
    n = len(load_audio(wav))
    windows = [min(model.encoders["audio"].window_samples, n - i)
               for i in range(0, n, model.encoders["audio"].window_samples)]
    expected = sum(model.audio_window_tokens(model.encoders["audio"].valid_frames(w)) for w in windows)
    assert counter.media("audio", wav) == expected
    assert counter.media("video", write_mp4(tmp_path / "x.mp4", frames=20, fps=4).read_bytes()) == \
           model.video_tokens(len(sample_frame_indices(20, 4.0, 1.0, model.config.video.max_frames)))
    messages = msgs("<image> What colour is this card?", "red")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert counter.text(messages) == len(ids) - 1
    result = stats(media_corpus, tmp_path / "o", model_dir=str(tmp_path / "m"), datasets=["text"], progress=False)
    assert json.loads(result.json_file.read_text())["datasets"][0]["tokens"]["text"]["sum"] > 0


def test_stats_accumulators_merge():
    counter = TokenCounter.__new__(TokenCounter)
    counter.tokenizer = None
    whole, a, b = DatasetStats("d", "train"), DatasetStats("d", "train"), DatasetStats("d", "train")
    for i in range(50):
        s = sample(f"k{i}", "w " * (i * 7 % 40 + 1), "r " * (i % 5 + 1))
        st = sample_stats(json.loads(s["json"]), s, counter)
        whole.add(st)
        (a if i % 2 else b).add(st)
    merged = a.merge(b).to_dict()
    assert merged == whole.to_dict()
