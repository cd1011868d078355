"""Hugging Face processor of an exported omni model (remote code: ships inside every export).

A transformers `ProcessorMixin` around omni's own processor (omni.model.processor.OmniProcessor,
shipped next to this file), built from the same four dicts (`processor_config.json`), so media
preprocessing and placeholder token counts are training's, not a copy:
- images: AnyRes tiles, each through open_clip's eval transform of the training tower;
- videos: frames sampled by encoders.video.read_video (decord; fps + cap), same transform;
- audio (float32 mono 16 kHz): whisper log-mel windows and valid-frame rule;
- each `<image>` / `<video>` / `<audio>` placeholder token becomes exactly the number of tokens
  the projector emits;
- labels (with `messages` and `return_labels=True`): the ids inside assistant replies (the chat
  template's `{% generation %}` mask), -100 elsewhere, media positions included.

Media are flat lists in placeholder order: the k-th placeholder of a kind, counted row-major over
the batch, takes that kind's k-th item.
"""

from __future__ import annotations

import copy

import torch
from transformers import BatchFeature, ProcessorMixin

from omni.model.fusion import IGNORE
from omni.model.processor import OmniProcessor as OmniProcessorCore


class OmniProcessor(ProcessorMixin):
    """`image_config`, `video_config`, `audio_config`, `token_config`: see omni.model.processor."""

    def __init__(self, tokenizer=None, image_config=None, video_config=None, audio_config=None,
                 token_config=None, chat_template=None, **kwargs):
        self.core = OmniProcessorCore(tokenizer, image_config, video_config, audio_config, token_config)
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        """What processor_config.json holds: the four configs (the core is rebuilt from them)."""
        out = {**self.core.configs(), "processor_class": type(self).__name__}
        if getattr(self, "auto_map", None):
            out["auto_map"] = self.auto_map
        return copy.deepcopy(out)

    # ---- text + media -> model inputs -------------------------------------------------------
    def __call__(self, messages=None, text=None, images=None, videos=None, audio=None,
                 add_generation_prompt=False, return_labels=False, padding_side=None, **kwargs):
        """`messages`: one conversation ([{"role", "content"}, ...]) or a list of them, rendered
        with the chat template; or `text`: already-rendered string(s). Placeholders in the
        contents (`<image>`, `<video>`, `<audio>`) bind to `images` (PIL), `videos` (path, bytes
        or a list of PIL frames) and `audio` (float32 mono 16 kHz waveforms) in order.
        Returns input_ids, attention_mask (padded on `padding_side`; default: left for generation
        prompts, else the tokenizer's side),
        labels (if asked), pixel_values + image_tiles, pixel_values_videos + video_frames,
        input_features (log-mel windows) + audio_valid."""
        if (messages is None) == (text is None):
            raise ValueError("OmniProcessor: pass exactly one of messages= or text=")
        if kwargs.pop("return_tensors", "pt") not in ("pt", None):
            raise ValueError("OmniProcessor returns torch tensors only (return_tensors='pt')")
        if kwargs:
            raise TypeError(f"OmniProcessor: unexpected arguments {sorted(kwargs)}")
        if messages is not None:
            batch = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            for conv in batch:
                self.core.refuse_control_tokens(conv)
            rendered = ["".join(m.get("content", "") for m in conv) for conv in batch]
        else:
            batch = [text] if isinstance(text, str) else list(text)
            rendered = batch
        media = {"image": list(images or []), "video": list(videos or []), "audio": list(audio or [])}
        self.core.check_placeholders(rendered, media)
        media_batch, counts = self.core.media(media)
        data: dict = {}
        if media_batch.image is not None:
            data["pixel_values"], data["image_tiles"] = media_batch.image, torch.tensor(media_batch.image_tiles)
        if media_batch.video is not None:
            data["pixel_values_videos"], data["video_frames"] = media_batch.video, torch.tensor(media_batch.video_frames)
        if media_batch.audio is not None:
            data["input_features"], data["audio_valid"] = media_batch.audio, torch.tensor(media_batch.audio_valid)

        seen: dict[str, int] = {}
        rows, label_rows = [], []
        for sample in batch:
            if messages is not None:
                enc = self.tokenizer.apply_chat_template(
                    sample, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
                    return_assistant_tokens_mask=return_labels)
                ids = list(enc["input_ids"])
                targets = list(enc["assistant_masks"]) if return_labels else [0] * len(ids)
            else:
                ids = self.tokenizer(sample, add_special_tokens=False)["input_ids"]
                targets = [0] * len(ids)
            out_ids, out_labels = self.core.expand(ids, targets, counts, seen)
            rows.append(out_ids)
            label_rows.append(out_labels)

        side = padding_side or ("left" if add_generation_prompt else self.tokenizer.padding_side)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
            ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(r), torch.tensor(lab), 1
        data = {"input_ids": ids, "attention_mask": mask, **({"labels": labels} if return_labels else {}), **data}
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
