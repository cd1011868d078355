"""OmniProcessor: chat messages + media -> input ids, labels and preprocessed media.

Each `<image>`, `<video>`, `<audio>` placeholder becomes exactly as many placeholder tokens as
the model's projector will produce for that medium (the model re-checks the count). Labels
are the token ids inside assistant replies (via the chat template's generation mask) and -100
everywhere else, media positions included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from encoders import anyres_tiles, read_video_frames
from omni.errors import SampleError
from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE, expand_placeholders
from omni.model.omni_model import OmniModel
from omni.presets import MODALITIES
from omni.tokenizer import PLACEHOLDERS


@dataclass
class Example:
    input_ids: torch.Tensor      # [L]
    labels: torch.Tensor         # [L]
    media: MediaBatch


class OmniProcessor:
    def __init__(self, tokenizer, model: OmniModel, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.image_encoder = model.encoders["image"]
        self.audio_encoder = model.encoders["audio"]
        self.video_cfg = model.config.video
        self.anyres = model.config.anyres
        self.image_tokens = model.image_tokens()
        self.video_tokens = model.video_tokens
        self.audio_window_tokens = model.audio_window_tokens
        self.token_ids = dict(model.token_ids)
        self.max_length = max_length or model.llm.config.max_position_embeddings

    # ---- media ----------------------------------------------------------------------------
    def _images(self, images: list[Image.Image], blank: bool):
        """AnyRes: each image becomes [thumbnail] + grid tiles, each tile through the tower."""
        tiles, counts = [], []
        for im in images:
            parts, _ = anyres_tiles(im.convert("RGB"), self.image_encoder.image_size, self.anyres)
            tiles.extend(parts)
            counts.append(len(parts))
        pixels = self.image_encoder.preprocess(tiles)
        return (torch.zeros_like(pixels) if blank else pixels), counts

    def _videos(self, videos: list, blank: bool):
        frames, counts = [], []
        for v in videos:
            clip = v if isinstance(v, list) else read_video_frames(v, self.video_cfg)
            pixels = self.image_encoder.preprocess([f.convert("RGB") for f in clip])
            frames.append(torch.zeros_like(pixels) if blank else pixels)
            counts.append(len(clip))
        return torch.cat(frames), counts

    def _audios(self, audios: list, blank: bool):
        mels, valid, tokens = [], [], []
        for wav in audios:
            wav = np.asarray(wav, dtype=np.float32)
            if blank:
                wav = np.zeros_like(wav)
            n = 0
            for window in self.audio_encoder.split_windows(wav):
                mels.append(self.audio_encoder.log_mel(window))
                v = self.audio_encoder.valid_frames(len(window))
                valid.append(v)
                n += self.audio_window_tokens(v)
            tokens.append(n)
        return torch.stack(mels), valid, tokens

    # ---- text -----------------------------------------------------------------------------
    def __call__(self, messages: list[dict], media: dict[str, list] | None = None,
                 add_generation_prompt: bool = False, blank: bool = False) -> Example:
        """`media` maps modality -> list in placeholder order: PIL images, videos (bytes/path or a
        list of PIL frames), audio waveforms (float32 mono 16 kHz). `blank` zeroes media content
        (the control that shows answers come from the media)."""
        media = {k: v for k, v in (media or {}).items() if v}
        unknown = set(media) - set(MODALITIES)
        if unknown:
            raise SampleError(f"media: unknown modality {sorted(unknown)}")
        text = "".join(m.get("content", "") for m in messages)
        for modality, ph in PLACEHOLDERS.items():
            n_ph, n_media = text.count(ph), len(media.get(modality, []))
            if n_ph != n_media:
                raise SampleError(f"{modality}: {n_ph} '{ph}' placeholder(s) in messages but {n_media} media file(s)")

        batch = MediaBatch()
        counts: dict[str, list[int]] = {}
        if "image" in media:
            batch.image, batch.image_tiles = self._images(media["image"], blank)
            counts["image"] = [self.image_tokens * t for t in batch.image_tiles]
        if "video" in media:
            batch.video, batch.video_frames = self._videos(media["video"], blank)
            counts["video"] = [self.video_tokens(f) for f in batch.video_frames]
        if "audio" in media:
            batch.audio, batch.audio_valid, counts["audio"] = self._audios(media["audio"], blank)

        enc = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=True,
        )
        out_ids, out_labels = expand_placeholders(enc["input_ids"], enc["assistant_masks"], self.token_ids, counts)
        if len(out_ids) > self.max_length:
            raise SampleError(f"sequence of {len(out_ids)} tokens exceeds max_length {self.max_length}")
        return Example(torch.tensor(out_ids), torch.tensor(out_labels), batch)


@dataclass
class Batch:
    input_ids: torch.Tensor               # [B, L]
    attention_mask: torch.Tensor | None   # [B, L]; None for packed rows (isolation via position_ids)
    labels: torch.Tensor                  # [B, L]
    media: MediaBatch
    position_ids: torch.Tensor | None = None  # [B, L]; restart at 0 for each packed sample

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.input_ids.to(device), move(self.attention_mask), self.labels.to(device),
                     self.media.to(device), move(self.position_ids))


def collate(examples: list[Example], pad_id: int, left_pad: bool = False) -> Batch:
    """Pad to the longest example (left padding for generation, right for training)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(length - n, length) if left_pad else slice(0, n)
        ids[i, sl], labels[i, sl], mask[i, sl] = e.input_ids, e.labels, 1
    return Batch(ids, mask, labels, MediaBatch.concat([e.media for e in examples]))
