"""The README.md model card of an export: metadata header, architecture, provenance, evals.

Provenance comes from the training folders (never from pickles): each stage's `stage.json`
(what trained, on which data, from which model), the last row of its `metrics.jsonl`, the data
manifests those stages name, and an `eval.json` written by `omni eval`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omni.modalities import MODALITIES


@dataclass
class StageRecord:
    """One training stage that led to the exported weights."""
    name: str
    path: str
    config: dict                         # stage.json
    last_metrics: dict | None = None     # last row of metrics.jsonl
    checkpoint: str | None = None        # set when the export came from a mid-stage checkpoint


@dataclass
class Provenance:
    source: str                          # what `--ckpt` pointed at
    kind: str                            # "stage output", "schedule run", "checkpoint", "model folder", "export"
    stages: list[StageRecord] = field(default_factory=list)   # oldest first
    manifests: dict[str, dict] = field(default_factory=dict)  # path -> {"name", "datasets": [...]} or {"error"}
    eval: dict | None = None
    eval_path: str | None = None


def _parameter_table(model) -> list[tuple[str, int]]:
    count = lambda m: sum(p.numel() for p in m.parameters())
    rows = [("LLM (" + type(model.llm).__name__ + ")", count(model.llm)),
            ("image tower (shared by video)", count(model.encoders["image"])),
            ("audio tower (whisper encoder)", count(model.encoders["audio"]))]
    rows += [(f"{m} projector ({model.config.projectors[m].kind})", count(model.projectors[m])) for m in MODALITIES]
    if model.talker is not None:
        rows.append(("talker (speech out)", count(model.talker)))
    rows.append(("total", count(model)))
    return rows


def _architecture(model) -> list[str]:
    cfg = model.config
    image = model.encoders["image"]
    tower = cfg.image.open_clip_model or f"open_clip VisionTransformer {cfg.image.vision_cfg}"
    tile_tokens = model.image_tokens()
    anyres = (f"AnyRes: up to {cfg.anyres.max_tiles} tiles{' + thumbnail' if cfg.anyres.thumbnail else ''}"
              if cfg.anyres.max_tiles else "AnyRes off: one tile per image")
    window = model.encoders["audio"].window_samples / 16000
    lines = [
        f"- **LLM**: `{type(model.llm).__name__}` ({model.llm.config.model_type}, "
        f"{model.llm.config.num_hidden_layers} layers, hidden {model.llm.config.hidden_size}, "
        f"vocab {model.llm.config.vocab_size})"
        + (f", initialised from `{cfg.llm.pretrained}`" if cfg.llm.pretrained else "")
        + (" with Baichuan 2 NormHead" if cfg.llm.norm_head else "")
        + (f"; trained with max-z loss {cfg.llm.max_z_loss}" if cfg.llm.max_z_loss else "") + ".",
        f"- **Image**: open_clip tower `{tower}`"
        + (f" (weights from `{cfg.image.pretrained}`)" if cfg.image.pretrained else "")
        + f", {image.image_size}-px tiles, {image.grid_size}x{image.grid_size} patches -> "
        f"{tile_tokens} tokens per tile through the `{cfg.projectors['image'].kind}` projector "
        f"{cfg.projectors['image'].options}; {anyres}.",
        (f"- **Video**: frames at {cfg.video.fps} fps, at most {cfg.video.max_frames}, through the same image tower "
         f"and a separate `{cfg.projectors['video'].kind}` projector: {model.video_tokens(1)} tokens per frame."),
        f"- **Audio**: whisper encoder ({cfg.audio.n_layer} layers, width {cfg.audio.n_state}, {cfg.audio.n_mels} mel "
        f"bins, {window:g} s windows)" + (f" from `{cfg.audio.checkpoint}`" if cfg.audio.checkpoint else "")
        + f", `{cfg.projectors['audio'].kind}` projector {cfg.projectors['audio'].options}: "
        f"{model.audio_window_tokens(model.encoders['audio'].cfg.n_ctx)} tokens per full window.",
        ("- **Fusion**: each `<image>` / `<video>` / `<audio>` placeholder is expanded by the processor to exactly "
         "the projector's token count; the projected features replace those positions in the LLM's input embeddings."),
    ]
    if model.talker is not None:
        t = cfg.talker
        codec = (f"the pretrained Mimi `{t.codec_pretrained}` (transformers `MimiModel`, first {t.codebooks} codebooks)"
                 if t.codec == "mimi" else f"a tiny codec: {t.codebooks} residual codebooks of {t.codebook_size} "
                 "entries over log-mel frames, fitted on the training speech (`tiny_codec.*`), decoded with librosa's "
                 "Griffin-Lim")
        lines.append(f"- **Speech out**: a talker ({t.layers}-layer Qwen2 decoder, width {t.hidden_size}) reads the "
                     f"LLM's hidden states at its answer and speaks codec frames (at most {t.max_frames}) of {codec}.")
    return lines


def _is_hub_id(name: str | None) -> bool:
    """A Hub repo id ("Qwen/Qwen2-7B"), not a local folder such as a converted checkpoint."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _stage_rows(prov: Provenance) -> list[str]:
    if not prov.stages:
        return ["No training records were found next to the exported weights (stage.json / metrics.jsonl)."]
    rows = ["| # | stage | trainable | steps | data (dataset: weight) | init from | last loss |",
            "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(prov.stages, 1):
        c = s.config
        data = c.get("data", {})
        datasets = ", ".join(f"{k}: {_fmt(v)}" for k, v in (data.get("datasets") or {}).items()) or "whole split"
        loss = _fmt(s.last_metrics["loss"]) if s.last_metrics and "loss" in s.last_metrics else "-"
        steps = str(c.get("steps", "-")) + (f" (exported at {s.checkpoint})" if s.checkpoint else "")
        init = c.get("init_from")
        init = (f"preset `{c.get('preset')}`" if not init
                else Path(init).parent.name if Path(init).name == "final" else f"`{init}`")
        rows.append(f"| {i} | `{s.name}` | {', '.join(f'`{t}`' for t in c.get('trainable', []))} | {steps} | "
                    f"{datasets} (`{Path(data.get('manifest', '?')).name}`) | {init} | {loss} |")
    return rows


def _manifest_rows(prov: Provenance) -> list[str]:
    if not prov.manifests:
        return ["No data manifests recorded."]
    out = []
    for path, m in prov.manifests.items():
        out.append(f"**`{path}`**" + (f" ({m['name']})" if m.get("name") else ""))
        if "error" in m:
            out += ["", f"(not readable at export time: {m['error']})", ""]
            continue
        out += ["", "| dataset | split | samples | weight | modalities | task |", "|---|---|---|---|---|---|"]
        for d in m["datasets"]:
            out.append(f"| {d['name']} | {d['split']} | {d['num_samples']} | {_fmt(d['weight'])} | "
                       f"{', '.join(d['modalities']) or 'text'} | {d.get('task') or '-'} |")
        out.append("")
    return out


def _eval_rows(prov: Provenance) -> list[str]:
    if not prov.eval:
        return [("No evaluation results were found (run `omni eval MODEL --data MANIFEST --out DIR` and pass "
                "`--eval DIR/eval.json` to `omni export`).")]
    rows = [(f"From `{prov.eval_path}` (exact match of the greedy answer; *blanked*: same prompts with zeroed "
            "media, so the gap to *accuracy* is what the model reads from the media)."), "",
            "| modality | task | n | accuracy | blanked | chance |", "|---|---|---|---|---|---|"]
    for key, r in prov.eval.items():
        rows.append(f"| {key} | {r.get('task', '-')} | {r.get('n', '-')} | {_fmt(r.get('accuracy', '-'))} | "
                    f"{_fmt(r.get('blanked_accuracy', '-'))} | {_fmt(r.get('chance', '-'))} |")
    return rows


USAGE = '''```python
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": "<image> <audio> What is shown, and what is heard?"}}]
inputs = processor(messages=messages, images=[Image.open("photo.jpg")],
                   audio=[waveform_16khz_mono_float32], add_generation_prompt=True)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


SPEECH_USAGE = '''Speaking an answer (the conversation with the answer as its last turn; labels mark it):

```python
answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
said = processor(messages=messages + [{{"role": "assistant", "content": answer}}],
                 images=[Image.open("photo.jpg")], audio=[waveform_16khz_mono_float32], return_labels=True)
waves, sample_rate = model.generate_speech(**said)   # one float32 mono wave per conversation
codes = model.speech_codes(**said)                   # or the codec codes [codebooks, frames]
```'''


def model_card(model, prov: Provenance, license: str, name: str, files: list[str]) -> str:
    """README.md text: YAML metadata (license, library, tags, base model) + the sections below.
    `name`: the Hub repo id, or the export folder's name."""
    from huggingface_hub import ModelCardData

    cfg = model.config
    data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="any-to-any",
        tags=["omni", "multimodal", "image", "video", "audio", "baichuan-omni", "custom_code"],
        base_model=cfg.llm.pretrained if _is_hub_id(cfg.llm.pretrained) else None,
    )
    params = _parameter_table(model)
    speaks = model.talker is not None
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name.split('/')[-1]}", "",
        (f"An omni-modal LLM (image, video, audio and text in; {'text and speech' if speaks else 'text'} out) "
         "trained with omni following the Baichuan-Omni recipe, exported for transformers. "
         f"Preset `{cfg.name}`, {params[-1][1]:,} parameters."), "",
        "## Architecture", "", *_architecture(model), "",
        "| part | parameters |", "|---|---|", *[f"| {p} | {n:,} |" for p, n in params], "",
        "## Usage", "",
        ("Needs `torch`, `transformers`, `open_clip_torch`, `openai-whisper`, `decord` and `av` (not omni). "
         "`trust_remote_code=True` runs the Python files of this repository (listed below)."), "",
        USAGE.format(repo=name), "",
        ("`generate` returns prompt + new tokens. Media are flat lists in placeholder order; videos are paths, "
         "bytes or lists of PIL frames; audio is float32 mono at 16 kHz."), "",
        *([SPEECH_USAGE.format(), "", _speech_needs(cfg), ""] if speaks else []),
        "## Training", "",
        f"Exported from `{prov.source}` ({prov.kind}). Stages, oldest first:", "", *_stage_rows(prov), "",
        "### Data manifests", "", *_manifest_rows(prov), "",
        "## Evaluation", "", *_eval_rows(prov), "",
        "## Intended use and limitations", "",
        "Research on omni-modal understanding: answering questions about images, short videos and speech or "
        "sounds, and the mix of them. The model inherits the biases and failure modes of its base LLM, towers "
        "and training data, "
        + ("speaks through a small talker whose voice is its training speech's, " if speaks else "produces text only, ")
        + "and has not been evaluated for safety-critical use. "
        + ("This is a tiny model trained on a synthetic corpus: it demonstrates the pipeline and is not "
           "useful for real inputs." if cfg.name == "tiny" else ""), "",
        "## License", "",
        (f"`{license}` (the `license` field above). Check that it is compatible with the licenses of the "
         "base weights listed under Architecture."), "",
        "## Files", "",
        *[f"- `{f}`" for f in files], "",
    ]
    return "\n".join(lines)


def _speech_needs(cfg) -> str:
    if cfg.talker.codec == "mimi":
        return f"The codec is loaded by `from_pretrained` from `{cfg.talker.codec_pretrained}`."
    return "Speaking needs `librosa` too (the tiny codec's decoder); `from_pretrained` reads its codebooks."


def read_eval(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected the eval.json written by `omni eval` (a mapping)")
    return data
