"""The synthetic corpus: format contract, media that carry the answer, disjoint splits, determinism."""

import hashlib
import io
import json
import re
import wave
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from omni import tiny_world as world
from omni.data import synth

SMALL = dict(train_per_task=8, val_per_task=4, samples_per_shard=3, seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus: manifest path, parsed manifest, {(task, split): [raw samples]}."""
    out = tmp_path_factory.mktemp("synth")
    manifest = synth.write_corpus(synth.SynthConfig(out_dir=str(out), **SMALL), progress=False)
    spec = yaml.safe_load(manifest.read_text())
    samples = {}
    for entry in spec["datasets"]:
        urls = str(manifest.parent / entry["urls"])
        samples[entry["task"], entry["split"]] = list(wds.WebDataset(urls, shardshuffle=False))
    return manifest, spec, samples


def meta(sample):
    return json.loads(sample["json"])


def media_files(sample, ext):
    """A sample's files of one extension in placeholder order: `ext`, or `0.ext`, `1.ext`, ..."""
    if ext in sample:
        return [sample[ext]]
    return [sample[f"{i}.{ext}"] for i in range(sum(bool(re.fullmatch(rf"\d+\.{ext}", k)) for k in sample))]


def dominant_colour(pixels):
    """Nearest palette colour to the mean of the clearly saturated pixels."""
    pixels = pixels.reshape(-1, 3).astype(float)
    saturated = pixels[pixels.max(1) - pixels.min(1) > 80]
    assert len(saturated) >= 20, "no saturated shape found"
    mean = saturated.mean(0)
    return min(world.COLOURS, key=lambda c: np.sum((np.array(world.COLOUR_RGB[c]) - mean) ** 2))


def read_wav(data):
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float) / 32768


def dominant_hz(signal):
    spectrum = np.abs(np.fft.rfft(signal))
    return np.argmax(spectrum) * 16000 / len(signal)


def png(sample):
    return np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))


def test_manifest_lists_every_task_and_split(corpus):
    manifest, spec, samples = corpus
    assert spec["name"] == "synth"
    expected = [(task, split) for task in world.TASKS for split in ("train", "val")]
    assert [(e["task"], e["split"]) for e in spec["datasets"]] == expected
    for e in spec["datasets"]:
        assert not Path(e["urls"]).is_absolute() and e["urls"].startswith("shards/")
        assert e["name"] == e["task"] and e["weight"] == 1.0
        assert e["modalities"] == world.TASK_MEDIA[e["task"]]
        assert e["num_samples"] == len(samples[e["task"], e["split"]]) == SMALL[f"{e['split']}_per_task"]
    assert "urls: shards/image_colour-train-{000000..000002}.tar" in manifest.read_text()


def test_samples_follow_the_contract(corpus):
    _, _, samples = corpus
    keys = Counter()
    for (task, split), items in samples.items():
        for s in items:
            keys[s["__key__"]] += 1
            m = meta(s)
            user, assistant = m["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert m["task"] == task and m["source"] == "synth"
            assert m["answer"] == assistant["content"] and m["answer"] in world.ANSWERS[task]
            for kind, ext in world.MEDIA_EXT.items():
                assert user["content"].count(f"<{kind}>") == len(media_files(s, ext)), (s["__key__"], kind)
            assert [k for k in world.MEDIA_EXT if f"<{k}>" in user["content"]] == world.TASK_MEDIA[task]
            assert s["__key__"].startswith(f"{task}-{split}-")
    assert max(keys.values()) == 1


def test_images_show_the_answer_colour(corpus):
    _, _, samples = corpus
    for split in ("train", "val"):
        for s in samples["image_colour", split]:
            assert png(s).shape == (32, 32, 3)
            assert dominant_colour(png(s)) == meta(s)["answer"]
        for s in samples["image_caption", split]:
            article, colour, shape = meta(s)["answer"].split()
            assert article == "a" and shape in world.SHAPES and dominant_colour(png(s)) == colour


def test_video_changes_from_a_to_the_answer(corpus):
    _, _, samples = corpus
    for s in samples["video_colour_change", "train"] + samples["video_colour_change", "val"]:
        vr = decord.VideoReader(io.BytesIO(s["mp4"]))
        assert len(vr) == 16 and vr.get_avg_fps() == pytest.approx(4.0)
        frames = vr.get_batch(list(range(16))).asnumpy()
        assert frames.shape == (16, 32, 32, 3)
        first, last = dominant_colour(frames[0]), dominant_colour(frames[-1])
        assert last == meta(s)["answer"] and first != last
        # what a 1 fps sampler sees: t = 0 s and 1 s before the change, 3 s after it
        assert dominant_colour(frames[4]) == first and dominant_colour(frames[12]) == last


def test_audio_plays_the_answer_note(corpus):
    _, _, samples = corpus
    for task in ("audio_note", "audio_caption"):
        for s in samples[task, "train"] + samples[task, "val"]:
            signal = read_wav(s["wav"])
            assert len(signal) == 16000
            note = meta(s)["answer"].split()[1] if task == "audio_caption" else meta(s)["answer"]
            assert dominant_hz(signal) == pytest.approx(world.NOTE_HZ[note], abs=3)
            loud = np.flatnonzero(np.abs(signal) > 0.1)
            assert 0.25 * 16000 < loud[-1] - loud[0] < 0.8 * 16000 and loud[-1] < 0.95 * 16000


def test_cross_task_answer_is_the_colour_on_the_tone_side(corpus):
    _, _, samples = corpus
    answers = Counter()
    for s in samples["image_audio_side", "train"] + samples["image_audio_side", "val"]:
        hz = dominant_hz(read_wav(s["wav"]))
        side = min(world.SIDE_HZ, key=lambda k: abs(world.SIDE_HZ[k] - hz))
        assert abs(world.SIDE_HZ[side] - hz) < 3
        image = png(s)
        top, bottom = dominant_colour(image[:16]), dominant_colour(image[16:])
        assert top != bottom
        assert meta(s)["answer"] == (top if side == "top" else bottom)
        assert world.SIDE_HZ["top"] > world.SIDE_HZ["bottom"]  # a high tone points up
        answers[side] += 1
    assert set(answers) == {"top", "bottom"}


def test_text_arith_sums(corpus):
    _, _, samples = corpus
    for s in samples["text_arith", "train"]:
        a, b = re.fullmatch(r"What is (\w+) plus (\w+)\?", meta(s)["messages"][0]["content"]).groups()
        assert world.NUMBERS.index(a) + world.NUMBERS.index(b) == world.NUMBERS.index(meta(s)["answer"])
        assert not any(k.endswith(tuple(world.MEDIA_EXT.values())) for k in s)


def test_vocabulary_covers_every_word(corpus):
    _, _, samples = corpus
    vocab = set(world.vocabulary())
    assert {"?", "."} <= vocab and all(w == w.lower() for w in vocab)
    for items in samples.values():
        for s in items:
            for message in meta(s)["messages"]:
                text = re.sub(r"<(image|video|audio)>", " ", message["content"]).lower()
                assert set(re.findall(r"[a-z]+|[?.,]", text)) <= vocab
    assert set(world.CHANCE) == set(world.TASKS)
    assert world.CHANCE["image_colour"] == pytest.approx(1 / 6) and world.CHANCE["text_arith"] == pytest.approx(1 / 9)


def test_splits_are_disjoint(corpus):
    _, _, samples = corpus
    digest = lambda b: hashlib.sha1(b).digest()  # noqa: E731
    for task in world.TASKS:
        train = {digest(v) for s in samples[task, "train"] for k, v in s.items() if k.endswith(("png", "mp4", "wav"))}
        val = {digest(v) for s in samples[task, "val"] for k, v in s.items() if k.endswith(("png", "mp4", "wav"))}
        assert not train & val, task
    cfg = synth.SynthConfig(out_dir="", **SMALL)
    for task in world.TASKS:
        generated = list(synth.iter_task(cfg, task))
        # what write_corpus wrote is exactly what iter_task yields
        written = [s["json"] for split in ("train", "val") for s in samples[task, split]]
        assert [s.to_wds()["json"] for s in generated] == written
        if task == "text_arith":  # 25 possible questions: shared by construction
            continue
        params = {sp: {s.params for s in generated if s.split == sp} for sp in ("train", "val")}
        assert not params["train"] & params["val"], task


def test_val_redraws_layouts_seen_in_train():
    """On a crowded layout space collisions happen, and the val split redraws them."""
    cfg = synth.SynthConfig(out_dir="", image_size=16, train_per_task=400, val_per_task=150)
    train = {s.params for s in synth.iter_samples(cfg, "image_colour", "train")}
    naive_val = {s.params for s in synth.iter_samples(cfg, "image_colour", "val")}
    assert train & naive_val, "expected collisions without exclusion: test is vacuous"
    val = [s for s in synth.iter_task(cfg, "image_colour") if s.split == "val"]
    assert len(val) == 150 and not train & {s.params for s in val}


def test_same_config_writes_identical_bytes(tmp_path):
    cfg = dict(train_per_task=3, val_per_task=2, samples_per_shard=2, seed=3)
    a = synth.write_corpus(synth.SynthConfig(out_dir=str(tmp_path / "a"), **cfg), progress=False).parent
    b = synth.write_corpus(synth.SynthConfig(out_dir=str(tmp_path / "b"), **cfg), progress=False).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 1 + 7 * 3
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other_cfg = synth.SynthConfig(out_dir=str(tmp_path / "c"), **{**cfg, "seed": 4})
    other = synth.write_corpus(other_cfg, progress=False).parent
    assert (other / files[1]).read_bytes() != (a / files[1]).read_bytes()


def test_writer_names_several_media_of_a_kind_by_index():
    media = {"image": [b"a", b"b"], "audio": [b"c"]}
    sample = synth.Sample("k-0", "t", "train", "<image> <image> <audio> same?", "no", (), media)
    assert set(sample.to_wds()) == {"__key__", "json", "0.png", "1.png", "wav"}
    with pytest.raises(ValueError, match="sample k-0: 2 <image> placeholders but 1 image files"):
        synth.Sample("k-0", "t", "train", "<image> <image>", "no", (), {"image": [b"a"]}).to_wds()
    with pytest.raises(ValueError, match="1 <video> placeholders but 0 video files"):
        synth.Sample("k-0", "t", "train", "<video>", "no", (), {}).to_wds()


def test_bad_config_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        synth.write_corpus(synth.SynthConfig(out_dir=str(tmp_path), image_size=31), progress=False)
