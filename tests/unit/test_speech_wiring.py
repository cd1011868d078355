"""Speech out wired into the data and the model: spoken answers in the corpus that no other stage
sees, the talker as a `talker.*` part of OmniModel chosen by stage globs, and the talker and fitted
codec kept in the model folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml

from omni.config import ConfigError
from omni.data import synth
from omni.data.loader import decode_media
from omni.data.records import record_from_raw
from omni.model.load import load_model
from omni.model.omni_model import OmniModel
from omni.model.speech import answer_wave, code_count, fit_codec, speak, thinker_states
from omni.modalities import SPOKEN_ANSWER
from omni.presets import build_preset
from omni.train.optim import set_trainable

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(train_per_task=6, val_per_task=2, samples_per_shard=4, seed=0)


def _samples(manifest):
    spec = yaml.safe_load(manifest.read_text())
    return {(e["task"], e["split"]): list(wds.WebDataset(str(manifest.parent / e["urls"]), shardshuffle=False))
            for e in spec["datasets"]}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """The same small corpus written without and with a voice."""
    plain = synth.write_corpus(synth.SynthConfig(out_dir=str(tmp_path_factory.mktemp("plain")), **SMALL), False)
    voiced = synth.write_corpus(synth.SynthConfig(out_dir=str(tmp_path_factory.mktemp("voiced")), voice="en",
                                                  **SMALL), False)
    return plain, voiced


@pytest.fixture(scope="module")
def corpora(manifests):
    return tuple(_samples(m) for m in manifests)


def test_a_voice_adds_the_spoken_answer_and_changes_nothing_else(corpora):
    plain, voiced = corpora
    assert plain.keys() == voiced.keys()
    spoken_by_answer: dict[str, bytes] = {}
    for key in plain:
        for a, b in zip(plain[key], voiced[key], strict=True):
            assert SPOKEN_ANSWER not in a and SPOKEN_ANSWER in b
            members = lambda raw: {k: v for k, v in raw.items() if not k.startswith("__")}  # noqa: E731
            assert a["__key__"] == b["__key__"] and members(a) == {k: v for k, v in members(b).items() if k != SPOKEN_ANSWER}
            answer = json.loads(b["json"])["answer"]
            assert spoken_by_answer.setdefault(answer, b[SPOKEN_ANSWER]) == b[SPOKEN_ANSWER]  # one rendering per answer
    waves = {a: answer_wave(w, 16_000) for a, w in spoken_by_answer.items()}
    assert all(0.2 < len(w) / 16_000 < 3 and abs(w).max() > 0.1 for w in waves.values())
    assert len({w.tobytes() for w in waves.values()}) == len(waves)  # different words sound different


def test_the_spoken_answer_is_no_input_medium(corpora):
    _, voiced = corpora
    raw = voiced["audio_note", "train"][0]
    rec = record_from_raw(raw)
    assert rec["__speech__"] == raw[SPOKEN_ANSWER] and SPOKEN_ANSWER not in rec["__media__"]
    assert len(decode_media(raw, "here")["audio"]) == 1  # the tone only, not the spoken answer too


def test_the_talker_is_a_part_chosen_by_globs_and_leaves_the_rest_of_init_alone():
    torch.manual_seed(0)
    plain, _ = OmniModel.from_config(build_preset("tiny"))
    torch.manual_seed(0)
    model, _ = OmniModel.from_config(build_preset("tiny", ["talker.enabled=true"]))
    assert plain.talker is None
    before = dict(plain.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("talker.decoder.") for n in names)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("talker."))
    trainable = set_trainable(model, ["talker.*"])
    assert trainable and all(n.startswith("talker.") for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("llm."))


def test_presets_name_their_codecs():
    assert build_preset("7b").talker.codec == "mimi" and build_preset("7b").talker.codec_pretrained == "kyutai/mimi"
    assert build_preset("tiny").talker.codec == "tiny" and not build_preset("tiny").talker.enabled
    with pytest.raises(ConfigError, match="codec_pretrained"):
        build_preset("tiny", ["talker.codec=mimi"])


def test_talker_and_fitted_codec_are_saved_and_loaded_with_the_model(tmp_path, corpora):
    _, voiced = corpora
    torch.manual_seed(0)
    plain, tokenizer = OmniModel.from_config(build_preset("tiny"))
    plain.save_pretrained(tmp_path / "thinker", tokenizer)
    model, _ = load_model(tmp_path / "thinker", ["talker.enabled=true"])  # a fresh talker on a saved thinker
    assert model.codec is None
    spoken = [raw[SPOKEN_ANSWER] for raw in voiced["image_colour", "train"]]
    waves = [answer_wave(b, 16_000) for b in spoken]
    model.codec = fit_codec(model.config.talker, spoken, seed=0)
    model.save_pretrained(tmp_path / "spoken", tokenizer)
    again, _ = load_model(tmp_path / "spoken")
    assert again.talker is not None and again.codec is not None
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in again.named_parameters())
    assert torch.equal(again.codec.encode(waves[0]), model.codec.encode(waves[0]))
    with pytest.raises(ConfigError, match="unexpected"):  # a saved talker's weights never vanish silently
        load_model(tmp_path / "spoken", ["talker.enabled=false"])
    ids = torch.tensor([[100, 101, 102, 103]])  # words, no media placeholders
    labels = torch.tensor([[-100, -100, 102, 103]])
    for m in (model, again):
        m.eval()
    states = [thinker_states(m, ids, torch.ones_like(ids), labels, None) for m in (model, again)]
    assert [s[0][0].shape for s in states] == [(2, model.llm.config.hidden_size)] * 2
    spoken = [speak(m, s, max_frames=5) for m, s in zip((model, again), states)]
    assert torch.equal(spoken[0][0], spoken[1][0])


def test_the_summed_loss_over_the_codes_counted_is_the_mean_loss():
    """The speech_out objective divides the talker's summed loss by `code_count` over the step; for
    one micro-batch that must be the talker's own mean, so no code is counted twice or left out."""
    torch.manual_seed(0)
    model, _ = OmniModel.from_config(build_preset("tiny", ["talker.enabled=true"]))
    ids = torch.tensor([[100, 101, 102, 103, 104], [100, 101, 102, 103, 0]])  # words, no media placeholders
    labels = torch.tensor([[-100, -100, 102, 103, 104], [-100, -100, -100, 103, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    codes = [torch.randint(0, 64, (4, 7)), torch.randint(0, 64, (4, 3))]
    summed = model(ids, mask, labels, speech=codes, num_items_in_batch=code_count(codes, 64)).loss
    mean = model(ids, mask, labels, speech=codes).loss
    assert code_count(codes, 64) == 4 * (7 + 3) + 2 * (4 + 3 + 2 + 1)  # frames, plus each codebook's EOS run
    assert torch.allclose(summed, mean, rtol=1e-6)


def test_a_pretrained_codec_trains_through_the_same_stage(manifests, tmp_path):
    """The Mimi route end to end: a speech_out stage on a (random-init, real-class) Mimi codec trains,
    and its model folder names the codec instead of copying it."""
    from omni.speech.mimi_codec import MimiCodec
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage
    from transformers import MimiConfig, MimiModel

    from tests.helpers import TINY_MIMI

    torch.manual_seed(0)
    MimiModel(MimiConfig(**TINY_MIMI)).save_pretrained(tmp_path / "mimi")
    overrides = ["talker.enabled=true", "talker.codec=mimi", f"talker.codec_pretrained={tmp_path / 'mimi'}",
                 "talker.codebooks=2", "talker.codebook_size=64"]
    cfg = load_stage(ROOT / "stages/tiny/3_speech_out.yaml", [
        "init_from=null", f"data.manifest={manifests[1]}", "steps=2", "batch.micro_batch=4", "log.interval=1",
        f"model_overrides=[{', '.join(overrides)}]", "data.datasets={audio_note: 1.0}"])
    final = train_stage(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert not (final / "tiny_codec.json").exists()
    model, _ = load_model(final)
    assert isinstance(model.codec, MimiCodec) and model.codec.codebooks == 2
