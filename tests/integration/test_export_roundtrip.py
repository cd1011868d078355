"""omni's own entry points give the same answers for a model folder and for its export: the export's
saved tokenizer is the one read back (not the LLM's default tokenizer class), so `omni eval` tables
and `omni chat` answers are equal on the same items."""
from __future__ import annotations

import subprocess
import sys

import pytest

from omni.eval import evaluate
from omni.model.load import load_model
from tests.helpers import image_and_tone

QA = ["image_colour", "audio_note", "image_audio_side", "text_arith"]


@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip") / "export"
    done = subprocess.run([sys.executable, "-m", "omni.cli", "-q", "export", "--ckpt", str(trained_tiny),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_export_reads_back_the_saved_tokenizer(trained_tiny, exported):
    _, folder_tok = load_model(trained_tiny, weights=False)
    _, export_tok = load_model(exported, weights=False)
    text = "<|im_start|>user\n<image> what colour is the shape ?<|im_end|>\n"
    assert type(export_tok) is type(folder_tok)
    assert export_tok(text)["input_ids"] == folder_tok(text)["input_ids"]
    assert len(export_tok) == len(folder_tok) and export_tok.chat_template == folder_tok.chat_template


def test_eval_tables_are_equal_for_the_folder_and_its_export(trained_tiny, exported, tiny_corpus):
    a = evaluate(trained_tiny, tiny_corpus, datasets=QA, limit=6, progress=False)
    b = evaluate(exported, tiny_corpus, datasets=QA, limit=6, progress=False)
    assert a == b


def test_chat_answers_are_equal_for_the_folder_and_its_export(trained_tiny, exported, tmp_path):
    img, wav = image_and_tone(tmp_path)
    answers = []
    for model in (trained_tiny, exported):
        done = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(model), "--image", str(img), "--audio",
                               str(wav), "--prompt", "which note is played?", "--max-new-tokens", "6"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        answers.append(done.stdout.strip())
    assert answers[0] and answers[0] == answers[1]
