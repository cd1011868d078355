"""The curation verbs on a corpus with spoken answers (`omni synth --voice en`): `answer.wav` is the
spoken answer, not an input medium (the loader's rule, `omni.modalities.input_member`). Stats count
it apart from the media, reweight and dedup neither list it as audio nor key duplicates on it, and
every rewritten sample carries it byte for byte."""
from __future__ import annotations

import json

import pytest
import webdataset as wds

from omni.curate.dedup import DedupConfig, dedup
from omni.curate.reweight import reweight
from omni.curate.stats import stats
from omni.data.manifest import load_manifest
from omni.data.synth import SynthConfig, write_corpus
from omni.modalities import SPOKEN_ANSWER, input_member

TASKS = ["image_colour", "audio_note", "text_arith"]


@pytest.fixture(scope="module")
def voiced(tmp_path_factory):
    out = tmp_path_factory.mktemp("voiced")
    return write_corpus(SynthConfig(out_dir=str(out), train_per_task=16, val_per_task=4, samples_per_shard=16,
                                    voice="en"), progress=False)


def _samples(manifest, name: str, split: str = "train") -> dict[str, dict]:
    (entry,) = load_manifest(manifest).select(split, [name])
    return {r["__key__"]: r for r in wds.WebDataset(entry.urls, shardshuffle=False)}


def test_the_spoken_answer_is_not_an_input_member():
    assert input_member(SPOKEN_ANSWER) is None
    assert input_member("wav") == ("audio", 0) and input_member("1.wav") == ("audio", 1)
    assert input_member("0.png") == ("image", 0) and input_member("json") is None


def test_stats_count_spoken_answers_apart_from_the_media(voiced, tmp_path):
    result = stats(voiced, tmp_path, preset="tiny", split="train", datasets=TASKS, progress=False)
    by_name = {s.name: s.to_dict() for s in result.datasets}
    print("\n" + result.table)
    assert by_name["image_colour"]["media_files"] == {"image": 16}
    assert by_name["image_colour"]["modality_mix"] == {"image": 16}
    assert by_name["audio_note"]["media_files"] == {"audio": 16}
    assert by_name["text_arith"]["media_files"] == {} and by_name["text_arith"]["modality_mix"] == {"text": 16}
    assert by_name["text_arith"]["tokens"]["media"]["max"] == 0  # a spoken answer puts no tokens in the input
    assert all(d["spoken_answers"] == 16 for d in by_name.values())
    assert json.loads((tmp_path / "stats.json").read_text())["datasets"][0]["spoken_answers"] == 16
    assert "| spoken answers |" in result.table


def test_reweight_keeps_spoken_answers_and_lists_no_audio_for_them(voiced, tmp_path):
    result = reweight(voiced, tmp_path, by="dataset", datasets=TASKS, progress=False)
    out = {e.name: e for e in load_manifest(result.manifest).datasets}
    assert out["image_colour"].modalities == ["image"] and out["text_arith"].modalities == []
    assert out["audio_note"].modalities == ["audio"]
    for name in TASKS:
        before, after = _samples(voiced, name), _samples(result.manifest, name)
        assert after and set(after) <= set(before)
        for key, sample in after.items():  # every member, the spoken answer included, carried unchanged
            assert {k: v for k, v in sample.items() if not k.startswith("__")} == \
                   {k: v for k, v in before[key].items() if not k.startswith("__")}, key


def test_dedup_by_media_does_not_key_text_samples_on_their_spoken_answers(voiced, tmp_path):
    """Arithmetic questions with the same answer share one answer.wav: were it an input medium, `--exact
    media` would keep one question per answer. As a text sample's, the key is its text."""
    before = _samples(voiced, "text_arith")
    texts = {json.dumps(json.loads(s["json"])["messages"]) for s in before.values()}
    answers = {s[SPOKEN_ANSWER] for s in before.values()}
    assert len(answers) < len(texts)  # the case where the two rules differ
    result = dedup(voiced, tmp_path, DedupConfig(exact="media", near=False), split="train", datasets=["text_arith"],
                   progress=False)
    (counts,) = result.counts
    assert counts.kept == len(texts) and counts.exact_removed == len(before) - len(texts)
    after = _samples(result.manifest, "text_arith")
    assert all(sample[SPOKEN_ANSWER] == before[key][SPOKEN_ANSWER] for key, sample in after.items())
