"""Inference latency on the tiny model (random weights, built and saved here), two measurements,
each alternative side by side in one process, taking turns for `--rounds` rounds (medians):

1. A text+image+audio query through `LocalGenerator` (omni/model/generate.py): time to first
   token (processor, media encoders, prefill) and decode tokens/s, with the KV cache (the real
   path: transformers' generate) vs without (each new token re-runs the LLM over the whole
   sequence; transformers' own `use_cache=False` with an embeddings prompt would drop the prompt
   after the first step, so the baseline is written out here). Both decode `--tokens` greedy tokens
   (end tokens suppressed) and the bench checks they are the same tokens.
2. The demo's real path (omni/demo/engine.py `DemoEngine.answer`): end of speech -> first token for
   a turn with the camera window (`video.max_frames` frames, shrunk as the app keeps them) and the
   utterance: everything encoded after speech, vs the frames encoded while the user speaks
   (`encode_ahead` as each frame arrives), vs frames and every whole audio window encoded while
   speaking (`encode_audio_ahead`), vs the LLM prefilled too (`prefill_ahead` on each microphone
   chunk that completes an audio window, into the session's `PromptCache`), vs that plus the
   utterance prefilled whole during the VAD's pause (its last, partial window too). Every mode
   must give the same answers.
   Next to the wall time it prints the CPU time this process spent from end of speech to the first
   token (`time.process_time`, all threads): on a machine shared with other jobs the wall time
   counts their time slices too, the CPU time does not (with `--threads 1` it is the wall time the
   turn would take on an idle core).

Usage: python bench/inference.py [--rounds 5] [--tokens 32] [--speech-s 3.5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omni.demo.engine import DemoEngine, TurnStats
from omni.demo.session import Conversation, MediaItem, shrink
from omni.model.generate import LocalGenerator
from omni.model.load import save_model_dir
from omni.model.omni_model import OmniModel
from omni.model.processor import collate
from omni.model.prompt_cache import PromptCache
from omni.presets import build_preset


def tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    model, tokenizer = OmniModel.from_config(build_preset("tiny"))
    return save_model_dir(model, tokenizer, folder / "tiny")


def image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-like 16 kHz waveform (tones + noise): the media policy keeps it (not silence)."""
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


class Steps:
    """Time stamps of the LLM's forward calls (one per generated token)."""

    def __init__(self, llm: torch.nn.Module):
        self.times: list[float] = []
        llm.register_forward_hook(lambda *a: self.times.append(time.perf_counter()))


@torch.no_grad()
def greedy_no_cache(model, ids: torch.Tensor, media, tokens: int, eos: list[int]) -> list[int]:
    """Greedy decoding without a KV cache: every step runs the LLM over prompt + tokens so far."""
    embeds = model.embed(ids, media)
    table = model.llm.get_input_embeddings()
    out: list[int] = []
    for _ in range(tokens):
        seq = torch.cat([embeds, table(torch.tensor([out], dtype=torch.long))], 1) if out else embeds
        logits = model.llm(inputs_embeds=seq, use_cache=False).logits[0, -1]
        logits[eos] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def kv_cache_vs_none(gen: LocalGenerator, args) -> None:
    model = gen.model
    steps = Steps(model.llm)
    messages = [{"role": "user", "content": "<image> <audio> what do you see and hear?"}]
    media = {"image": [image(1)], "audio": [speech(args.speech_s)]}
    runs: dict[str, list[tuple[float, float]]] = {"cache": [], "none": []}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up, not counted
        for mode in ("cache", "none"):
            steps.times.clear()
            t0 = time.perf_counter()
            example = gen.prompt(messages, media, args.tokens)
            batch = collate([example], gen.tokenizer.pad_token_id, left_pad=True)
            if mode == "cache":
                new = gen.model.generate(batch.input_ids, batch.attention_mask, gen._media(batch.media),
                                         max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                         suppress_tokens=gen.eos, do_sample=False,
                                         pad_token_id=gen.tokenizer.pad_token_id)[0].tolist()
            else:
                new = greedy_no_cache(model, batch.input_ids, gen._media(batch.media), args.tokens, gen.eos)
            tokens[mode] = new
            ttft = steps.times[0] - t0
            if r:
                runs[mode].append((ttft, (len(steps.times) - 1) / (steps.times[-1] - steps.times[0])))
    prompt = len(example.input_ids)
    (t_c, r_c), (t_n, r_n) = ((statistics.median(r[0] for r in runs[m]), statistics.median(r[1] for r in runs[m]))
                              for m in ("cache", "none"))
    print(f"\n1. text+image+audio query, prompt {prompt} tokens, {args.tokens} new tokens "
          f"(same tokens: {tokens['cache'] == tokens['none']})")
    print(f"{'':<14} {'TTFT ms':>9} {'decode tok/s':>13} {'ms/token':>9}")
    print(f"{'KV cache':<14} {t_c * 1000:>9.1f} {r_c:>13.1f} {1000 / r_c:>9.2f}")
    print(f"{'no cache':<14} {t_n * 1000:>9.1f} {r_n:>13.1f} {1000 / r_n:>9.2f}")
    print(f"ratio cache/none: TTFT {t_c / t_n:.3f}, time per decoded token {r_n / r_c:.3f}")


# what runs while the user speaks: (frames through the image tower, whole audio windows through the
# audio tower, the LLM prefilled with the prompt so far, the utterance prefilled whole during the
# VAD's pause); the rest runs after the end of speech
MODES = {"after": (False, False, False, False), "frames ahead": (True, False, False, False),
         "frames+audio ahead": (True, True, False, False), "+ LLM prefill ahead": (True, True, True, False),
         "+ VAD pause": (True, True, True, True)}


def fresh_turn(engine: DemoEngine) -> None:
    """Forget every frame, audio window and preprocessing the engine kept: a new camera window and utterance."""
    engine.frame_cache._cache.clear()  # noqa: SLF001
    engine.audio_cache._cache.clear()  # noqa: SLF001
    engine.processor._memo["picture"].clear()  # noqa: SLF001
    engine.processor._memo["window"].clear()  # noqa: SLF001


def spoken_turn(engine: DemoEngine, shot: list, wav: np.ndarray, mode: tuple[bool, bool, bool, bool],
                cache: PromptCache | None) -> tuple[Conversation, float]:
    """What the app does while the user speaks (`mode`, one of MODES), then the turn it sends: a
    chat whose one user turn holds the camera window `shot` and the utterance `wav`; and the
    seconds spent while speaking."""
    frames_ahead, audio_ahead, llm_ahead, pause = mode
    window = engine.audio_cache.tower.window_samples
    chunk = 1600  # the microphone's 100 ms chunks
    spent = 0.0  # while the user speaks: frames arrive, windows of speech fill
    if llm_ahead:  # what the app does on each microphone chunk that completes an audio window
        spent += engine.prefill_ahead(cache, Conversation(), shot, wav[:0])
        spent += sum(engine.prefill_ahead(cache, Conversation(), shot, wav[:end])
                     for end in range(chunk, wav.size + 1, chunk) if end % window < chunk)
        if pause:  # the VAD's pause began: the utterance it would end is known whole
            spent += engine.prefill_ahead(cache, Conversation(), shot, wav, partial=True)
    else:
        if frames_ahead:
            spent += sum(engine.encode_ahead(f) for f in shot)
        if audio_ahead:
            spent += sum(engine.encode_audio_ahead(wav[:end]) for end in range(window, wav.size + 1, window))
    chat = Conversation()
    chat.add_user("what do you see and hear?", [MediaItem("video", shot, "camera"), MediaItem("audio", wav, "microphone")])
    return chat, spent


def camera_frames(engine: DemoEngine) -> list[Image.Image]:
    side = engine.processor.image_config["image_size"]
    return [shrink(image(10 + i, 320), side) for i in range(engine.video.max_frames)]  # as the app keeps them


def demo_speech_to_first_token(folder: Path, args) -> None:
    engine = DemoEngine(folder, max_new_tokens=8)
    frames = camera_frames(engine)
    wav = speech(args.speech_s)
    window = engine.audio_cache.tower.window_samples
    got: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    answers: dict[str, set[str]] = {m: set() for m in MODES}
    first_cpu: list[float] = []  # process CPU time at each LLM forward
    engine.model.llm.register_forward_hook(lambda *a: first_cpu.append(time.process_time()))
    during: dict[str, list[float]] = {m: [] for m in MODES}
    prefilled: dict[str, int] = {}
    for r in range(args.rounds + 1):  # round 0 warms up, not counted
        for mode, (frames_ahead, audio_ahead, llm_ahead, pause) in MODES.items():
            fresh_turn(engine)
            shot = [f.rotate(r * 7) for f in frames]  # new pixels each round; the same for every mode
            cache = PromptCache() if llm_ahead else None
            chat, spent = spoken_turn(engine, shot, wav, MODES[mode], cache)
            stats = TurnStats()
            hits, misses = engine.audio_cache.hits, engine.audio_cache.misses
            first_cpu.clear()
            c_input, t_input = time.process_time(), time.perf_counter()  # end of speech
            answers[mode].add("".join(engine.answer(chat, stats, t_input, prompt_cache=cache)))
            assert stats.frames_ahead == (stats.frames if frames_ahead else 0), stats.line()
            assert (engine.audio_cache.hits > hits) == audio_ahead
            assert (stats.prefilled < stats.prompt_tokens) == llm_ahead, stats.line()
            assert (engine.audio_cache.misses == misses) == pause  # the partial window too
            prefilled[mode] = stats.prefilled
            if r:
                got[mode].append(stats.ttft_s)
                cpu[mode].append(first_cpu[0] - c_input)
                during[mode].append(spent)
    after = statistics.median(got["after"])
    same = all(answers[m] == answers["after"] for m in MODES)
    print(f"\n2. demo: end of speech -> first token, {len(frames)} camera frames + {args.speech_s:g} s of speech "
          f"(audio windows of {window / 16000:g} s); prompt {stats.prompt_tokens} tokens, "
          f"{prefilled['+ LLM prefill ahead']} / {prefilled['+ VAD pause']} run after speech with the LLM "
          f"prefilled ahead / also in the VAD's pause; "
          f"same answers in every mode: {same}")
    cpu_after = statistics.median(cpu["after"])
    print(f"{'while speaking':<20} {'wall ms':>8} {'ratio vs after':>15} {'CPU ms':>8} {'CPU ratio':>10} "
          f"{'ms spent while speaking':>24}")
    for mode in MODES:
        ms, c = statistics.median(got[mode]), statistics.median(cpu[mode])
        print(f"{mode:<20} {ms * 1000:>8.1f} {ms / after:>15.3f} {c * 1000:>8.1f} {c / cpu_after:>10.3f} "
              f"{statistics.median(during[mode]) * 1000:>24.1f}")


# the random thinker's 8 tokens are mostly outside the tiny tokenizer's 60 words (no text); the talker speaks
# what a trained tiny model answers, one word
SPOKEN = "orange"
VOICE_WORDS = ("orange", "purple", "seven", "green", "three", "yellow")  # the tiny codec is fitted on these


def give_voice(folder: Path, out: Path, messages: list[dict], media: dict, answer: str, word: str = SPOKEN,
               steps: int = 80) -> Path:
    """The model in `folder` with a talker, saved to `out`: the tiny codec fitted on espeak-ng's
    renderings of VOICE_WORDS, and the talker (random init) fitted `steps` steps to say `word` for
    `answer` to `messages` + `media`. Not a trained voice (docs/speech_out.md trains one): a talker
    that speaks real codec frames, decoded to real audio, for timing the path and testing its plumbing."""
    from omni.model.load import load_model
    from omni.model.speech import answer_states, talker_batch
    from omni.speech.synth import speak
    from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig

    torch.manual_seed(0)
    model, tokenizer = load_model(folder, ["talker.enabled=true"])
    section = model.config.talker
    config = TinyCodecConfig(codebooks=section.codebooks, codebook_size=section.codebook_size)
    waves = {w: speak(w, config.sample_rate) for w in dict.fromkeys((word, *VOICE_WORDS))}
    model.codec = TinyCodec.fit(list(waves.values()), config)
    states = answer_states(LocalGenerator(model, tokenizer, batch_size=1), [messages], [media], [answer])
    batch = talker_batch(states, [model.codec.encode(waves[word])], section.codebook_size)
    model.talker.train()
    opt = torch.optim.AdamW(model.talker.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model.talker(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_model_dir(model, tokenizer, out)


def demo_speech_to_first_audio(folder: Path, args) -> None:
    """End of speech -> first chunk of the spoken answer, through the demo's path (`DemoEngine.answer`,
    then `DemoEngine.speak`), for the spoken camera turn of measurement 2, with everything after
    speech and with everything prepared while speaking (the VAD mode)."""
    modes = {m: MODES[m] for m in ("after", "+ VAD pause")}
    plain = DemoEngine(folder, max_new_tokens=8)
    frames, wav = camera_frames(plain), speech(args.speech_s)
    chat, _ = spoken_turn(plain, frames, wav, modes["after"], None)
    voiced = give_voice(folder, folder.parent / "voiced", chat.messages(), chat.media(), SPOKEN)
    engine = DemoEngine(voiced, max_new_tokens=8)
    rows: dict[str, list[tuple[float, ...]]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):  # round 0 warms up, not counted
        for mode, flags in modes.items():
            fresh_turn(engine)
            cache = PromptCache() if flags[2] else None
            chat, _ = spoken_turn(engine, [f.rotate(r * 7) for f in frames], wav, flags, cache)
            stats = TurnStats()
            c_input, t_input = time.process_time(), time.perf_counter()  # end of speech
            for _piece in engine.answer(chat, stats, t_input, prompt_cache=cache):
                pass
            text_done = time.perf_counter() - t_input
            first_cpu = None
            for _chunk in engine.speak(chat.messages(), chat.media(), SPOKEN, stats, t_input):
                first_cpu = first_cpu or time.process_time() - c_input
            assert stats.audio_chunks >= 2 and stats.audio_s > 0, stats.line()  # real audio, in chunks
            if r:
                rows[mode].append((stats.ttft_s, text_done, stats.first_audio_s, first_cpu,
                                   time.perf_counter() - t_input, stats.audio_s, stats.audio_chunks))
    med = {m: [statistics.median(col) for col in zip(*rows[m])] for m in modes}
    codec = engine.model.codec
    print(f"\n3. demo: end of speech -> first audio chunk, the turn of 2. ({stats.tokens} answer tokens, then "
          f"{SPOKEN!r} spoken), a tiny "
          f"talker ({sum(p.numel() for p in engine.model.talker.parameters()) / 1e6:.2f} M parameters) and the "
          f"tiny codec ({codec.frame_rate:g} frames/s, Griffin-Lim); first chunk "
          f"{engine.speech_chunks[0]} frames, then {engine.speech_chunks[1]}")
    print(f"{'while speaking':<14} {'TTFT ms':>8} {'text done ms':>13} {'first audio ms':>15} {'CPU ms':>7} "
          f"{'all audio ms':>13} {'speech s':>9} {'chunks':>7}")
    for mode in modes:
        ttft, done, first, cpu, total, seconds, chunks = med[mode]
        print(f"{mode:<14} {ttft * 1000:>8.1f} {done * 1000:>13.1f} {first * 1000:>15.1f} {cpu * 1000:>7.1f} "
              f"{total * 1000:>13.1f} {seconds:>9.2f} {chunks:>7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--speech-s", type=float, default=3.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp))
        print(f"tiny model, random weights, CPU fp32, {torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
        kv_cache_vs_none(LocalGenerator.load(folder, batch_size=1, device="cpu"), args)
        demo_speech_to_first_token(folder, args)
        demo_speech_to_first_audio(folder, args)


if __name__ == "__main__":
    main()
