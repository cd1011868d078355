"""Speech out end to end (issue point 1): a tiny thinker trained briefly on the synthetic world, then
the speech_out stage (thinker frozen, talker trained on the corpus's spoken answers), answers held-out
questions with speech whose word (DTW against the corpus's recording of every candidate answer) is,
on every task the thinker has learned (image and video at least), the thinker's own answer and
>= 90 % right, far above chance and above the same talker with everything the thinker hands it
blanked; held-out codec frames are right on all four (image, video, audio, image+audio). `omni chat
--speak` writes the spoken answer. The module took 10.6 min on 2 cores shared at load average ~8 and
2.9 min on a quiet Zen 5 (thinker 250 steps, talker 150 steps, synth and the evals)."""
from __future__ import annotations

import json
from pathlib import Path

import soundfile
import webdataset as wds

from omni.modalities import SPOKEN_ANSWER
from omni.speech_eval import evaluate_speech, format_speech_table
from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"image": "image_colour", "video": "video_colour_change", "audio": "audio_note",
         "image+audio": "image_audio_side"}

def test_held_out_questions_are_answered_with_the_right_spoken_words(speaking_model, spoken_corpus):
    results = evaluate_speech(speaking_model, spoken_corpus, datasets=list(TASKS.values()), progress=False)
    print("\n" + format_speech_table(results))
    assert set(results) == set(TASKS)
    for key, r in results.items():
        assert r["n"] >= 20 and r["candidates"] >= 5, key
        assert r["frame_accuracy"] >= 0.9, (key, r)  # held-out codec frames, teacher-forced
    # where this short thinker has learned the task (text >= 90 %: image and video always; audio and
    # image+audio only partly, and how far varies with the CPU's rounding: >= 90 % on every modality
    # needs the schedule's thinker, docs/speech_out.md "Tiny results"), the talker says the
    # thinker's own answer and the spoken answer is right >= 90 %, far above both controls
    learned = [key for key, r in results.items() if r["text_accuracy"] >= 0.9]
    assert {"image", "video"} <= set(learned), results
    for key in learned:
        r = results[key]
        assert r["spoken_matches_text"] >= 0.9 and r["spoken_accuracy"] >= 0.9, (key, r)
        assert r["spoken_accuracy"] >= max(r["chance"], r["blanked_accuracy"]) + 0.5, (key, r)
    # the stage's own held-out scoring (teacher-forced codec frames) saw the talker learn
    stage = json.loads((Path(speaking_model).parent / "eval.json").read_text())
    print(f"speech_out held-out frame accuracy {stage['before']['frame_accuracy']:.3f} -> "
          f"{stage['after']['frame_accuracy']:.3f} over {stage['after']['codes']} codes")
    assert stage["after"]["frame_accuracy"] >= stage["before"]["frame_accuracy"] + 0.3


def test_chat_speak_writes_the_spoken_answer(speaking_model, spoken_corpus, tmp_path, capsys):
    """`omni chat --speak OUT.wav` writes a WAV whose word (DTW against the corpus's recordings of the
    task's answers) is the answer the chat printed."""
    from omni.cli.main import main
    from omni.model.speech import answer_wave
    from omni.speech.match import nearest_word

    shard = next((spoken_corpus.parent / "shards").glob("image_colour-val-*.tar"))
    raws = list(wds.WebDataset(str(shard), shardshuffle=False))
    candidates = {json.loads(r["json"])["answer"]: r[SPOKEN_ANSWER] for r in raws}
    image = tmp_path / "shape.png"
    image.write_bytes(raws[0]["png"])
    out = tmp_path / "answer.wav"
    main(["chat", str(speaking_model), "--image", str(image), "--prompt", "What colour is the shape?",
          "--max-new-tokens", "4", "--speak", str(out)])
    said = capsys.readouterr().out.strip()
    assert said in candidates, said
    wave, rate = soundfile.read(out, dtype="float32")
    heard, _ = nearest_word(wave, {a: answer_wave(b, rate) for a, b in candidates.items()}, rate)
    assert heard == said


def test_chat_speak_needs_a_talker(trained_tiny, tmp_path):
    line = cli_error("chat", str(trained_tiny), "--prompt", "What is two plus three?", "--speak",
                     str(tmp_path / "a.wav"))
    assert "no talker" in line and "speech_out" in line
