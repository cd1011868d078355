"""`omni data build`: LLaVA / ShareGPT / ASR / caption inputs -> validated shards, manifest, rejects."""
from __future__ import annotations

import argparse
import io
import json
import wave

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from omni.cli.data import add_data_commands
from omni.curate import build as B
from omni.curate import formats
from omni.curate.common import CurationError
from omni.data.loader import decode_sample
from omni.data.manifest import load_manifest


# ---------------------------------------------------------------- real media files
def write_image(path, colour=(200, 30, 30), size=(40, 32)):
    Image.new("RGB", size, colour).save(path)
    return path


def write_wav(path, seconds=0.5, hz=440.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_mp4(path, frames=8, fps=4, size=32):
    with av.open(str(path), mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 30) % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def read_shards(manifest_path, name, split="train"):
    entry = {(d.name, d.split): d for d in load_manifest(manifest_path).datasets}[name, split]
    return entry, list(wds.DataPipeline(wds.SimpleShardList(entry.urls), wds.tarfile_to_samples()))


def rejects(result):
    return [json.loads(line) for line in result.rejects_file.read_text().splitlines()]


def turn(who, text):
    return {"from": who, "value": text}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "img").mkdir()
    write_image(root / "img" / "red.jpg")
    write_image(root / "img" / "blue.png", (30, 30, 200))
    write_image(root / "img" / "green.jpg", (30, 200, 30))
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    write_mp4(root / "clip.mp4")
    write_wav(root / "a.wav")
    write_wav(root / "b.wav", hz=220.0)
    return root


LLAVA = [
    {"id": "ok", "image": "img/red.jpg",
     "conversations": [turn("human", "<image>\nWhat colour?"), turn("gpt", "Red.")]},
    {"id": "noph", "image": "img/blue.png", "conversations": [turn("human", "What colour?"), turn("gpt", "Blue."),
                                                                 turn("human", "Sure?"), turn("gpt", "Yes.")]},
    {"id": "two", "image": ["img/red.jpg", "img/blue.png"],
     "conversations": [turn("system", "Be brief."), turn("human", "<image> vs <image>: same?"), turn("gpt", "No.")]},
    {"id": "vid", "video": "clip.mp4",
     "conversations": [turn("human", "<image>\nWhat happens?"), turn("gpt", "It fades.")]},
    {"id": "missing", "image": "img/nope.jpg", "conversations": [turn("human", "<image> hi"), turn("gpt", "x")]},
    {"id": "broken", "image": "img/broken.jpg", "conversations": [turn("human", "<image> hi"), turn("gpt", "x")]},
    {"id": "order", "image": "img/red.jpg", "conversations": [turn("gpt", "<image> hi"), turn("human", "x")]},
    {"id": "empty", "image": "img/red.jpg", "conversations": [turn("human", "<image> hi"), turn("gpt", "  ")]},
    {"id": "count", "image": "img/red.jpg", "conversations": [turn("human", "<image> <image>"), turn("gpt", "x")]},
    {"id": "role", "conversations": [turn("human", "hi"), turn("robot", "beep")]},
    {"id": "tail", "image": "img/green.jpg", "conversations": [turn("human", "<image> a"), turn("gpt", "b"),
                                                                  turn("human", "c")]},
    {"id": "nofield", "image": "img/red.jpg"},
]
LLAVA_CODES = {"missing": "missing_media", "broken": "undecodable_media", "order": "bad_role_order",
               "empty": "empty_reply", "count": "placeholder_mismatch", "role": "bad_role", "tail": "no_reply",
               "nofield": "missing_field"}


@pytest.fixture(scope="module")
def llava_build(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_out")
    src = media / "llava.json"
    src.write_text(json.dumps(LLAVA, indent=1))
    cfg = B.BuildConfig(format="llava", inputs=[str(src)], out_dir=str(out), name="llava_mini",
                        media_root=str(media), samples_per_shard=2)
    return out, B.build(cfg, progress=False)


def test_llava_valid_samples_written_in_loader_format(llava_build):
    out, result = llava_build
    print(B.format_result(result))
    assert result.written == 4 and result.rejected == len(LLAVA) - 4
    entry, samples = read_shards(result.manifest, "llava_mini")
    assert entry.num_samples == 4 and entry.task == "vqa" and entry.weight == 1.0
    assert entry.modalities == ["image", "video"]
    assert result.shards == 2  # 2 samples per shard
    by_id = {}
    for raw in samples:
        meta, messages, media_ = decode_sample(raw)  # the training loader's own decoder
        assert meta["source"] == "llava_mini" and meta["task"] == "vqa"
        assert all(m["role"] in ("system", "user", "assistant") for m in messages)
        by_id[meta["id"]] = (raw, messages, media_)
    assert set(by_id) == {"ok", "noph", "two", "vid"}
    # LLaVA convention: a missing <image> is prepended to the first user turn
    assert by_id["noph"][1][0]["content"] == "<image>\nWhat colour?"
    assert [m["role"] for m in by_id["noph"][1]] == ["user", "assistant", "user", "assistant"]
    # several images of one kind: 0.jpg, 1.png in placeholder order
    raw_two = by_id["two"][0]
    assert {"0.jpg", "1.png"} <= set(raw_two) and by_id["two"][1][0] == {"role": "system", "content": "Be brief."}
    assert [im.getpixel((0, 0))[2] > 150 for im in by_id["two"][2]["image"]] == [False, True]
    # LLaVA-Video: <image> read as <video> when the record has a video and no image
    assert by_id["vid"][1][0]["content"] == "<video>\nWhat happens?" and "mp4" in by_id["vid"][0]


def test_llava_rejects_name_key_line_and_reason(llava_build):
    out, result = llava_build
    rows = rejects(result)
    assert len(rows) == len(LLAVA) - 4
    ids = [r["id"] for r in LLAVA]
    for row in rows:
        index = int(row["key"].rsplit("-", 1)[1])
        assert row["code"] == LLAVA_CODES[ids[index]], row
        assert "llava.json:" in row["where"]
    missing = next(r for r in rows if r["code"] == "missing_media")
    assert "nope.jpg" in missing["reason"] and "--media-root" in missing["reason"]
    report = json.loads(result.report_file.read_text())
    assert report["reasons"] == {c: 1 for c in LLAVA_CODES.values()} and report["written"] == 4


def test_built_samples_feed_the_processor(llava_build, tiny_model):
    """Shards from `build` are training-ready: the processor expands every placeholder."""
    from omni.data.loader import decode_sample
    from omni.model.processor import OmniProcessor

    model, tokenizer = tiny_model
    proc = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    _, samples = read_shards(llava_build[1].manifest, "llava_mini")
    for raw in samples:
        _, messages, media_ = decode_sample(raw)
        ex = proc(messages, media_)
        assert (ex.labels != -100).any()


def test_sharegpt_jsonl_with_bad_lines(tmp_path):
    src = tmp_path / "chat.jsonl"
    lines = [
        json.dumps({"id": 1, "conversations": [turn("human", "Hi"), turn("gpt", "Hello!")]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                    "system": "You are terse."}),
        "",
        json.dumps({"conversations": [turn("human", "look <image>"), turn("gpt", "where?")]}),
        json.dumps({"conversations": [turn("human", "Q"), turn("gpt", 5)]}),
        json.dumps([1, 2]),
    ]
    src.write_text("\n".join(lines) + "\n")
    result = B.build(B.BuildConfig(format="sharegpt", inputs=[str(src)], out_dir=str(tmp_path / "out"),
                                   name="chat", source="sharegpt-test"), progress=False)
    assert result.written == 2
    codes = {r["where"].rsplit(":", 1)[1]: r["code"] for r in rejects(result)}
    assert codes == {"2": "bad_json", "5": "placeholder_mismatch", "6": "bad_field", "7": "bad_record"}
    entry, samples = read_shards(result.manifest, "chat")
    metas = [json.loads(s["json"]) for s in samples]
    assert entry.modalities == [] and entry.task == "chat"
    assert metas[1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert {m["source"] for m in metas} == {"sharegpt-test"}


def test_asr_jsonl_and_tsv(media, tmp_path):
    jl = tmp_path / "asr.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"audio_filepath": str(media / "a.wav"), "text": "a tone", "duration": 0.5},
        {"audio_filepath": "b.wav", "text": "another tone"},
        {"audio_filepath": "gone.wav", "text": "lost"},
        {"audio_filepath": "a.wav"},
    ]))
    tsv = tmp_path / "asr.tsv"
    tsv.write_text("path\ttranscript\nb.wav\tlow tone\n")
    out = tmp_path / "out"
    result = B.build(B.BuildConfig(format="asr", inputs=[str(jl), str(tsv)], out_dir=str(out), name="asr",
                                   media_root=str(media)), progress=False)
    assert (result.written, result.reasons) == (3, {"missing_media": 1, "missing_field": 1})
    entry, samples = read_shards(result.manifest, "asr")
    assert entry.modalities == ["audio"] and entry.task == "asr"
    for raw in samples:
        meta, messages, media_ = decode_sample(raw)
        assert messages[0]["content"] == "<audio>\nTranscribe the audio." and len(media_["audio"]) == 1
        assert abs(len(media_["audio"][0]) - 8000) < 10
    assert [json.loads(s["json"])["messages"][1]["content"] for s in samples] == ["a tone", "another tone", "low tone"]


def test_caption_folder_and_manifest_update(media, tmp_path):
    folder = tmp_path / "caps"
    (folder / "sub").mkdir(parents=True)
    write_image(folder / "cat.jpg")
    (folder / "cat.txt").write_text("A red card.\n")
    write_wav(folder / "sub" / "beep.wav")
    (folder / "sub" / "beep.txt").write_text("A beep.")
    write_image(folder / "orphan.png")
    write_image(folder / "anim.gif")
    out = tmp_path / "out"
    # a second dataset in the same output folder: the manifest gains an entry, keeps the first
    B.build(B.BuildConfig(format="sharegpt", inputs=[str(_chat(tmp_path))], out_dir=str(out), name="chat"),
            progress=False)
    result = B.build(B.BuildConfig(format="captions", inputs=[str(folder)], out_dir=str(out), name="caps"),
                     progress=False)
    assert result.written == 2 and result.reasons == {"missing_caption": 1, "unsupported_media": 1}
    assert {d.name for d in load_manifest(result.manifest).datasets} == {"chat", "caps"}
    entry, samples = read_shards(result.manifest, "caps")
    assert entry.modalities == ["image", "audio"]
    prompts = sorted(json.loads(s["json"])["messages"][0]["content"] for s in samples)
    assert prompts == ["<audio>\nDescribe the audio.", "<image>\nDescribe the image."]


def _chat(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"conversations": [turn("human", "Hi"), turn("gpt", "Hey")]}) + "\n")
    return p


def test_json_array_is_streamed_and_bad_array_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_CHUNK", 16)  # force many refills, records straddling chunk borders
    recs = [{"id": i, "conversations": [turn("human", f"q{i} " * 7), turn("gpt", "a\n" * 3)]} for i in range(20)]
    src = tmp_path / "arr.json"
    src.write_text(json.dumps(recs, indent=2))
    got = list(formats.iter_json(src))
    assert [r["id"] for _, r in got] == list(range(20))
    lines = src.read_text().splitlines()
    assert all(lines[int(w.rsplit(":", 1)[1]) - 1].strip() == "{" for w, _ in got)  # line of each record
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"a": 1},\n {"b": oops}\n]')
    with pytest.raises(CurationError, match=r"bad.json:3: invalid JSON"):
        list(formats.iter_json(bad))


def test_cli_verb_and_clear_errors(media, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="omni")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    src = media / "llava.json"
    out = tmp_path / "cli"
    args = parser.parse_args(["-q", "data", "build", "--format", "llava", "--input", str(src), "--name", "m",
                              "--media-root", str(media), "--out", str(out)])
    args.func(args)
    assert "written 4 samples" in capsys.readouterr().out
    assert load_manifest(out / "manifest.yaml").datasets[0].num_samples == 4
    args = parser.parse_args(["data", "build", "--format", "llava", "--input", str(tmp_path / "nope.json"),
                              "--name", "m", "--out", str(out)])
    with pytest.raises(SystemExit, match="nope.json: no such file"):
        args.func(args)
    args = parser.parse_args(["data", "build", "--format", "llava", "--input", str(src), "--name", "a.b",
                              "--out", str(out)])
    with pytest.raises(SystemExit, match="'a.b'"):
        args.func(args)


def test_images_decode_check_uses_loader(media):
    raw = {"__key__": "k", "json": b'{"messages": []}', "jpg": (media / "img" / "broken.jpg").read_bytes()}
    with pytest.raises(B.Reject, match="undecodable_media: .*'jpg' does not decode"):
        B.check_media(raw)
    raw = {"__key__": "k", "json": b'{"messages": []}', "mp4": b"\x00" * 64}
    with pytest.raises(B.Reject, match="'mp4'"):
        B.check_media(raw)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    B.check_media({"__key__": "k", "json": b'{"messages": []}', "png": buf.getvalue(),
                   "mp4": (media / "clip.mp4").read_bytes()})


def test_rebuild_with_nothing_valid_removes_the_stale_entry(tmp_path):
    out = tmp_path / "out"
    B.build(B.BuildConfig(format="sharegpt", inputs=[str(_chat(tmp_path))], out_dir=str(out), name="chat"),
            progress=False)
    B.build(B.BuildConfig(format="sharegpt", inputs=[str(_chat(tmp_path))], out_dir=str(out), name="keep"),
            progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [turn("human", "only a question")]}) + "\n")
    result = B.build(B.BuildConfig(format="sharegpt", inputs=[str(bad)], out_dir=str(out), name="chat"),
                     progress=False)
    assert (result.written, result.reasons, result.manifest) == (0, {"no_reply": 1}, None)
    assert [d.name for d in load_manifest(out / "manifest.yaml").datasets] == ["keep"]
    assert not list((out / "shards").glob("chat-train-*.tar"))


def test_badly_encoded_jsonl_line_is_one_reject(tmp_path):
    src = tmp_path / "latin1.jsonl"
    good = json.dumps({"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]}).encode()
    src.write_bytes(good + b"\n" + '{"conversations": [{"from": "human", "value": "caf\xe9"}]}'.encode("latin-1")
                    + b"\n" + good + b"\n")
    result = B.build(B.BuildConfig(format="sharegpt", inputs=[str(src)], out_dir=str(tmp_path / "o"), name="enc"),
                     progress=False)
    assert (result.written, result.reasons) == (2, {"bad_json": 1})
    assert rejects(result)[0]["where"].endswith("latin1.jsonl:2")
