"""The synthetic world's fixed words, tasks and answers (docs/data_format.md describes its corpus).

Two things share them: the corpus writer (omni/data/synth.py) and the tiny preset's offline
word-level tokenizer (omni/tokenizer.py), whose vocabulary is every word of the world.
"""
from __future__ import annotations

import re

from omni.modalities import PLACEHOLDERS

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 225, 30),
    "purple": (150, 40, 200),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# Labels only: pitches are spaced 4-5 semitones apart (>= 2 whisper mel filters), not solfege.
NOTES = ("do", "re", "mi", "fa", "sol")
NOTE_HZ = {"do": 262.0, "re": 349.0, "mi": 440.0, "fa": 587.0, "sol": 740.0}
SIDES = ("top", "bottom")
SIDE_HZ = {"top": 880.0, "bottom": 220.0}  # a high tone points up, a low tone down
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

SAMPLE_RATE = 16_000
VIDEO_FPS = 4
VIDEO_FRAMES = 16  # 4 s
VIDEO_BIT_RATE = 2_000_000
CHANGE_WINDOW_S = (1.2, 2.8)

PROMPTS = {
    "image_caption": "<image> Describe the image.",
    "image_colour": "<image> What colour is the shape?",
    "video_colour_change": "<video> What colour does the shape turn into?",
    "audio_note": "<audio> Which note is played?",
    "audio_caption": "<audio> Transcribe the audio.",
    "image_audio_side": "<image> <audio> A high tone means the top, a low tone the bottom. What colour is the shape there?",
    "text_arith": "What is {a} plus {b}?",
}
TASKS = list(PROMPTS)
TASK_MEDIA = {  # media kinds a task's samples carry; [] for text only
    "image_caption": ["image"],
    "image_colour": ["image"],
    "video_colour_change": ["video"],
    "audio_note": ["audio"],
    "audio_caption": ["audio"],
    "image_audio_side": ["image", "audio"],
    "text_arith": [],
}
ANSWERS = {  # each task's full answer set
    "image_caption": [f"a {c} {s}" for c in COLOURS for s in SHAPES],
    "image_colour": list(COLOURS),
    "video_colour_change": list(COLOURS),
    "audio_note": list(NOTES),
    "audio_caption": [f"a {n} tone" for n in NOTES],
    "image_audio_side": list(COLOURS),
    "text_arith": list(NUMBERS),
}
CHANCE = {task: 1.0 / len(answers) for task, answers in ANSWERS.items()}
MEDIA_EXT = {"image": "png", "video": "mp4", "audio": "wav"}
SPLITS = ("train", "val")

_WORD = re.compile(r"<[a-z]+>|[a-z]+|[?.,]")


def vocabulary() -> list[str]:
    """Every word and punctuation token of any question or answer, lowercase, sorted.

    Media placeholders (`<image>`, ...) are special tokens, not words, and are left out."""
    texts = [p for t, p in PROMPTS.items() if t != "text_arith"]
    texts += [PROMPTS["text_arith"].format(a=a, b=b) for a in NUMBERS[:5] for b in NUMBERS[:5]]
    texts += [a for answers in ANSWERS.values() for a in answers]
    words = {w for text in texts for w in _WORD.findall(text.lower())}
    return sorted(w for w in words if w not in PLACEHOLDERS.values())
