"""Hugging Face processor of an exported omni model (remote code: ships inside every export).

The same rules as `omni.processor.OmniProcessor`, from the same functions:
- images: AnyRes tiles (encoders.anyres.anyres_tiles), each through open_clip's eval transform
  built from the training tower's resolved preprocess config (`image_config["preprocess"]`);
- videos: frames sampled by encoders.video.read_video_frames (decord; fps + cap), same transform;
- audio (float32 mono 16 kHz): whisper log-mel windows, windowing and valid-frame rule of
  encoders.audio.AudioEncoder (built on the meta device: its methods need no weights);
- each `<image>` / `<video>` / `<audio>` placeholder token becomes exactly the number of tokens
  the projector emits (`num_tokens` of projectors built on the meta device);
- labels (with `messages` and `return_labels=True`): the ids inside assistant replies (the chat
  template's `{% generation %}` mask), -100 elsewhere, media positions included.

Media are flat lists in placeholder order: the k-th placeholder of a kind, counted row-major over
the batch, takes that kind's k-th item.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from transformers import BatchFeature, ProcessorMixin

from encoders.anyres import AnyResConfig, anyres_tiles
from encoders.audio import AudioEncoder, AudioTowerConfig
from encoders.video import VideoSamplingConfig, read_video_frames
from omni.model.fusion import IGNORE, expand_placeholders
from projectors import build_projector

MODALITIES = ("image", "video", "audio")


def _meta_projector(spec: dict):
    """A projector for its `num_tokens` rule only: built on the meta device, no memory."""
    with torch.device("meta"):
        return build_projector(spec["kind"], in_dim=1, out_dim=1, **spec.get("options", {}))


class OmniProcessor(ProcessorMixin):
    """`image_config`: {"preprocess": open_clip PreprocessCfg fields, "image_size", "num_patches",
    "anyres": {"max_tiles", "thumbnail"}, "projector": {"kind", "options"}};
    `video_config`: {"fps", "max_frames", "projector"}; `audio_config`: whisper dims
    {"n_mels", "n_ctx", "n_state", "n_head", "n_layer"} + "projector"; `token_config`:
    {"placeholders": {modality: string}, "token_ids": {modality: id}, "max_length"}."""

    def __init__(self, tokenizer=None, image_config=None, video_config=None, audio_config=None,
                 token_config=None, chat_template=None, **kwargs):
        self.image_config = dict(image_config)
        self.video_config = dict(video_config)
        self.audio_config = dict(audio_config)
        self.token_config = dict(token_config)
        preprocess = {k: tuple(v) if isinstance(v, list) else v for k, v in self.image_config["preprocess"].items()}
        self._transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)  # = ImageEncoder's
        self._anyres = AnyResConfig(**self.image_config["anyres"])
        self._video = VideoSamplingConfig(fps=self.video_config["fps"], max_frames=self.video_config["max_frames"])
        dims = {k: self.audio_config[k] for k in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")}
        with torch.device("meta"):
            self._audio = AudioEncoder(AudioTowerConfig(**dims))
        self._projectors = {"image": _meta_projector(self.image_config["projector"]),
                            "video": _meta_projector(self.video_config["projector"]),
                            "audio": _meta_projector(self.audio_config["projector"])}
        num_patches = self.image_config["num_patches"]
        self.image_tokens = self._projectors["image"].num_tokens(num_patches)   # per tile
        self.video_tokens = self._projectors["video"].num_tokens(num_patches)   # per frame
        self.token_ids = {m: int(self.token_config["token_ids"][m]) for m in MODALITIES}
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        """What processor_config.json holds: the four configs (the helpers above are rebuilt from them)."""
        out = {"image_config": self.image_config, "video_config": self.video_config,
               "audio_config": self.audio_config, "token_config": self.token_config,
               "processor_class": type(self).__name__}
        if getattr(self, "auto_map", None):
            out["auto_map"] = self.auto_map
        return copy.deepcopy(out)

    # ---- media ----------------------------------------------------------------------------
    def _pixels(self, images) -> torch.Tensor:
        return torch.stack([self._transform(im) for im in images])

    def _images(self, images):
        tiles, counts = [], []
        for im in images:
            parts, _ = anyres_tiles(im.convert("RGB"), self.image_config["image_size"], self._anyres)
            tiles.extend(parts)
            counts.append(len(parts))
        return self._pixels(tiles), counts

    def _videos(self, videos):
        frames, counts = [], []
        for v in videos:
            clip = v if isinstance(v, list) else read_video_frames(v, self._video)
            frames.append(self._pixels([f.convert("RGB") for f in clip]))
            counts.append(len(clip))
        return torch.cat(frames), counts

    def _audios(self, audios):
        mels, valid, tokens = [], [], []
        for wav in audios:
            n = 0
            for window in self._audio.split_windows(np.asarray(wav, dtype=np.float32)):
                mels.append(self._audio.log_mel(window))
                v = self._audio.valid_frames(len(window))
                valid.append(v)
                n += self._projectors["audio"].num_tokens(v)
            tokens.append(n)
        return torch.stack(mels), valid, tokens

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
            rendered = ["".join(m.get("content", "") for m in conv) for conv in batch]
        else:
            batch = [text] if isinstance(text, str) else list(text)
            rendered = batch
        media = {"image": list(images or []), "video": list(videos or []), "audio": list(audio or [])}
        for modality, ph in self.token_config["placeholders"].items():
            n_ph = sum(r.count(ph) for r in rendered)
            if n_ph != len(media[modality]):
                raise ValueError(f"{modality}: {n_ph} '{ph}' placeholder(s) in the text but "
                                 f"{len(media[modality])} item(s) passed")

        data: dict = {}
        counts: dict[str, list[int]] = {}
        if media["image"]:
            data["pixel_values"], tiles = self._images(media["image"])
            data["image_tiles"] = torch.tensor(tiles)
            counts["image"] = [self.image_tokens * t for t in tiles]
        if media["video"]:
            data["pixel_values_videos"], frames = self._videos(media["video"])
            data["video_frames"] = torch.tensor(frames)
            counts["video"] = [self.video_tokens * f for f in frames]
        if media["audio"]:
            data["input_features"], valid, counts["audio"] = self._audios(media["audio"])
            data["audio_valid"] = torch.tensor(valid)

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
            out_ids, out_labels = expand_placeholders(ids, targets, self.token_ids, counts, seen)
            if len(out_ids) > self.token_config["max_length"]:
                raise ValueError(f"sequence of {len(out_ids)} tokens exceeds max_length {self.token_config['max_length']}")
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
