"""Shared fixtures: tiny models and a tiny synthetic corpus, built once per session."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
SUITE_ENVIRONMENT = dict(os.environ)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Code a test runs in this process may set environment variables (a one-process DeepSpeed run sets
    LOCAL_RANK, which accelerate then reads as a launcher's and waits for RANK); the next test and the
    processes it starts get the environment the suite started with (also after a module or session
    fixture that set something)."""
    yield
    for key in set(os.environ) - set(SUITE_ENVIRONMENT):
        if not key.startswith("PYTEST_"):  # pytest's own, which it removes itself
            del os.environ[key]
    for key, value in SUITE_ENVIRONMENT.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model():
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    torch.manual_seed(0)
    return OmniModel.from_config(build_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small synthetic corpus (shards + manifest) shared by the data/training tests."""
    from omni.data.synth import SynthConfig, write_corpus

    out = tmp_path_factory.mktemp("synth")
    return write_corpus(SynthConfig(out_dir=str(out), train_per_task=48, val_per_task=12,
                                    samples_per_shard=24), progress=False)


# its own mix, not the quickstart's (2_sft.yaml weights the cross-modal and arithmetic tasks for a short run)
TRAINED_TINY_MIX = "{text_arith: 0.5, image_colour: 1.0, video_colour_change: 1.0, audio_note: 1.0, image_audio_side: 3.0}"


@pytest.fixture(scope="session")
def trained_tiny(tiny_corpus, tmp_path_factory):
    """A tiny model trained 24 steps on the tiny corpus, so greedy answers are words (after only
    8 steps it still answers prompts with a video by its end token alone)."""
    from pathlib import Path

    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    root = Path(__file__).resolve().parents[1]
    cfg = load_stage(root / "stages/tiny/2_sft.yaml", [f"data.manifest={tiny_corpus}", "init_from=null",
                                                      "steps=24", "batch.micro_batch=8", "optim.lr=3e-3",
                                                      f"data.datasets={TRAINED_TINY_MIX}"])
    return train_stage(cfg, tmp_path_factory.mktemp("trained-tiny"), progress=False)


SPOKEN_MIX = "{image_colour: 1.0, video_colour_change: 1.0, audio_note: 1.0, image_audio_side: 2.0}"
THINKER = dict(train_per_task=400, steps=250, lr="2e-3", micro_batch=32)
SPEECH = dict(steps=150, lr="3e-3", micro_batch=32)


@pytest.fixture(scope="session")
def spoken_corpus(tmp_path_factory):
    """A synthetic corpus with spoken answers (`answer.wav`, espeak-ng's `en`), 24 held-out per task."""
    from omni.data.synth import SynthConfig, write_corpus

    out = tmp_path_factory.mktemp("spoken-synth")
    return write_corpus(SynthConfig(out_dir=str(out), train_per_task=THINKER["train_per_task"],
                                    val_per_task=24, samples_per_shard=200, voice="en"), progress=False)


@pytest.fixture(scope="session")
def speaking_model(spoken_corpus, tmp_path_factory):
    """A tiny thinker trained briefly (2_sft.yaml from scratch) on four tasks, then its talker trained by
    the speech_out stage (thinker frozen): `ROOT/speech/final`, with the stage's held-out eval.json. Shared
    by the speech-out and voice-guard tests (trained once per session: minutes on two cores)."""
    from pathlib import Path

    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    stages = Path(__file__).resolve().parents[1] / "stages/tiny"
    root = tmp_path_factory.mktemp("speech-out")
    thinker = train_stage(load_stage(stages / "2_sft.yaml", [
        f"data.manifest={spoken_corpus}", "init_from=null", f"steps={THINKER['steps']}",
        f"optim.lr={THINKER['lr']}", f"batch.micro_batch={THINKER['micro_batch']}", f"data.datasets={SPOKEN_MIX}"]),
        root / "thinker", progress=False)
    cfg = load_stage(stages / "3_speech_out.yaml", [
        f"data.manifest={spoken_corpus}", f"init_from={thinker}", f"steps={SPEECH['steps']}",
        f"optim.lr={SPEECH['lr']}", f"batch.micro_batch={SPEECH['micro_batch']}", f"data.datasets={SPOKEN_MIX}",
        f"data.eval={spoken_corpus}", "data.eval_limit=0"])
    return train_stage(cfg, root / "speech", progress=False)


@pytest.fixture(scope="session")
def speaking_tiny(trained_tiny, tmp_path_factory):
    """`trained_tiny` with a talker fitted briefly to say one word (bench/inference.py `give_voice`)
    for its answer to QUESTION about the test image: (model folder, image path, the answer)."""
    from omni.inference import load_media, with_placeholders
    from omni.model.generate import LocalGenerator
    from tests.helpers import image_and_tone, load_bench

    tmp = tmp_path_factory.mktemp("speaking-tiny")
    img, _ = image_and_tone(tmp)
    messages = [{"role": "user", "content": with_placeholders(SPEAKING_QUESTION, {"image": 1})}]
    media = load_media(images=[img])
    gen = LocalGenerator.load(trained_tiny, device="cpu")
    answer = "".join(gen.stream(gen.prompt(messages, media), 6)).strip()
    assert answer, "the trained tiny model answered nothing: its talker would have nothing to say"
    return load_bench("inference").give_voice(trained_tiny, tmp / "voiced", messages, media, answer), img, answer


SPEAKING_QUESTION = "what colour is the shape?"


@pytest.fixture(scope="session")
def qwen2_7b(tmp_path_factory) -> list[str]:
    """Model overrides that point the 7B preset's LLM at a local folder holding Qwen2-7B's published
    config.json (bench/qwen2_7b_config.json), for tests that need the 7B architecture where the hub is
    out of reach: every rank and `omni plan` read it the way they read the hub's."""
    import shutil
    from pathlib import Path

    folder = tmp_path_factory.mktemp("qwen2-7b-config")
    shutil.copy(Path(__file__).resolve().parents[1] / "bench/qwen2_7b_config.json", folder / "config.json")
    return [f"llm.pretrained={folder}"]
