"""Spoken answers to held-out questions, scored by ear (`omni eval --speech`, docs/speech_out.md).

Per held-out sample: the thinker answers greedily in text; it is run again teacher-forced on its own
answer, and the talker speaks codec codes from its hidden states and answer embeddings; the codec
decodes them to audio; the word matcher (DTW over log-mel, omni/speech/match.py) picks the nearest
of the task's candidate answers, each heard as the corpus's own recording of it (`answer.wav`).
Right when the nearest candidate is the reference answer (speech is cut at twice the longest
candidate: nothing longer can be heard as one). Beside it: chance (1/k for k candidate
answers), the same pipeline with everything the thinker hands the talker blanked to zeros (so any
accuracy above chance there is a talker prior, not what the thinker said), the thinker's text
accuracy, how often the word heard is the thinker's own text answer (right or wrong: the talker's
fidelity), and the talker's codec-frame accuracy teacher-forced on the reference answer's codes.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from omni.config import ConfigError
from omni.data.loader import SkipCounter, decode_sample, split_stream, where
from omni.data.manifest import load_manifest
from omni.errors import SampleError
from omni.eval import answer_matches
from omni.modalities import SPOKEN_ANSWER
from omni.model.generate import LocalGenerator
from omni.model.speech import answer_states, answer_wave, speak, teacher_forced_scores
from omni.speech.match import log_mel, nearest_mel

SPEECH_EVAL_FILE = "eval_speech.json"


def _samples(entry, limit: int | None) -> list[tuple]:
    """(prompt messages, media, reference answer, spoken answer bytes) of a dataset's first samples."""
    counter, out = SkipCounter(max_fraction=0.5, min_seen=10), []
    for raw in split_stream(entry, counter):
        try:
            meta, messages, media = decode_sample(raw)
            if SPOKEN_ANSWER not in raw:
                raise SampleError(f"{where(raw)}: no spoken answer ({SPOKEN_ANSWER}); write the corpus with "
                                  "`omni synth --voice en`")
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            out.append((prompt, media, meta.get("answer", messages[-1]["content"]), raw[SPOKEN_ANSWER]))
        except SampleError as e:
            counter.skip(where(raw), e)
            continue
        if limit and len(out) >= limit:
            break
    return out


def _batch_scores(generator: LocalGenerator, chunk: list[tuple], candidates: dict, max_new_tokens: int,
                  max_frames: int) -> dict:
    """Summed results of one batch; `candidates`: each candidate answer's log-mel (`log_mel`)."""
    model, codec = generator.model, generator.model.codec
    prompts, media, refs, spoken = zip(*chunk, strict=True)
    said = generator.generate([generator.prompt(p, m, max_new_tokens) for p, m in zip(prompts, media)],
                              max_new_tokens)
    states = answer_states(generator, prompts, media, said)
    out = {"spoken": 0, "blanked": 0, "agree": 0, "text": sum(answer_matches(s, r) for s, r in zip(said, refs))}
    targets = [codec.encode(answer_wave(b, codec.sample_rate)) for b in spoken]
    for key, blank in (("spoken", False), ("blanked", True)):
        for codes, ref, text in zip(speak(model, states, max_frames, blank), refs, said, strict=True):
            heard = nearest_mel(log_mel(codec.decode(codes), codec.sample_rate), candidates)[0] \
                if codes.shape[1] else None
            out[key] += heard == ref
            if not blank:  # the talker says what the thinker wrote, right or wrong
                out["agree"] += heard is not None and answer_matches(text, heard)
    reference = answer_states(generator, prompts, media, refs)  # teacher-forced on the reference answers
    _, out["frames_right"], out["frames"] = teacher_forced_scores(model, reference, targets)
    return out


def evaluate_speech(model_dir: str | Path, manifest_path: str | Path, split: str = "val",
                    datasets: list[str] | None = None, limit: int | None = None, batch_size: int = 32,
                    max_new_tokens: int = 8, progress: bool = True, device: str | None = None,
                    dtype: str | None = None) -> dict:
    """Spoken-answer accuracy table keyed by modality (as `omni eval`'s)."""
    generator = LocalGenerator.load(model_dir, batch_size=batch_size, device=device, dtype=dtype)
    if generator.model.talker is None or generator.model.codec is None:
        raise ConfigError(f"{model_dir}: no talker and codec to speak with; train a speech_out stage "
                          "(stages/tiny/3_speech_out.yaml) on it first")
    entries = load_manifest(manifest_path).select(split, datasets)
    keys = ["+".join(e.modalities) or "text" for e in entries]
    results = {}
    for entry, key in zip(entries, keys):
        key = entry.name if keys.count(key) > 1 else key
        samples = _samples(entry, limit)
        if not samples:
            raise ConfigError(f"{manifest_path}: dataset {entry.name} ({split}) has no sample with a spoken answer")
        codec = generator.model.codec
        spoken = {ref: answer_wave(b, codec.sample_rate) for _, _, ref, b in samples}  # as the corpus says each
        candidates = {ref: log_mel(wave, codec.sample_rate) for ref, wave in spoken.items()}
        # nothing longer than twice the longest candidate can be heard as one: speech is cut there
        longest = max(len(wave) for wave in spoken.values()) / codec.sample_rate * codec.frame_rate
        max_frames = min(generator.model.config.talker.max_frames, int(2 * longest) + 1)
        totals: dict[str, int] = {}
        for i in tqdm(range(0, len(samples), batch_size), desc=f"{key} (speech)", disable=not progress, leave=False):
            for k, v in _batch_scores(generator, samples[i:i + batch_size], candidates, max_new_tokens,
                                      max_frames).items():
                totals[k] = totals.get(k, 0) + int(v)
        n = len(samples)
        results[key] = {"dataset": entry.name, "task": entry.task or entry.name, "n": n, "candidates": len(candidates),
                        "chance": 1.0 / len(candidates), "spoken_accuracy": totals["spoken"] / n,
                        "blanked_accuracy": totals["blanked"] / n, "text_accuracy": totals["text"] / n,
                        "spoken_matches_text": totals["agree"] / n,
                        "frame_accuracy": totals["frames_right"] / max(totals["frames"], 1)}
    return results


def format_speech_table(results: dict) -> str:
    lines = [f"{'modality':<14}{'task':<22}{'n':>5}{'spoken':>9}{'blanked':>9}{'chance':>8}{'text':>7}"
             f"{'said=text':>10}{'frames':>8}"]
    for key, r in results.items():
        lines.append(f"{key:<14}{r['task']:<22}{r['n']:>5}{r['spoken_accuracy']:>9.3f}{r['blanked_accuracy']:>9.3f}"
                     f"{r['chance']:>8.3f}{r['text_accuracy']:>7.3f}{r['spoken_matches_text']:>10.3f}"
                     f"{r['frame_accuracy']:>8.3f}")
    return "\n".join(lines)


def write_speech_results(results: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SPEECH_EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
