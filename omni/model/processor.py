"""OmniProcessor: chat messages + media -> input ids, labels and preprocessed media.

Each `<image>`, `<video>`, `<audio>` placeholder becomes exactly as many placeholder tokens as
the model's projector will produce for that medium (the model re-checks the count). Labels
are the token ids inside assistant replies (via the chat template's generation mask) and -100
everywhere else, media positions included.

The processor is built from four plain dicts, never from a model, so training
(`OmniProcessor.from_config(model_config, tokenizer, token_ids)`) and an export (whose
`processor_config.json` holds `configs()`, wrapped by the export's transformers processor)
run the same code:
- image_config: {"preprocess": open_clip PreprocessCfg fields, "image_size", "num_patches",
  "anyres": {"max_tiles", "thumbnail"}, "projector": {"kind", "options"}};
- video_config: {"fps", "max_frames", "projector"};
- audio_config: whisper dims {"n_mels", "n_ctx", "n_state", "n_head", "n_layer"}, "max_windows"
  (absent in older exports: AudioTowerConfig's default) + "projector";
- token_config: {"placeholders": {modality: string}, "token_ids": {modality: id}, "max_length"}.
Token counts come from the projectors' `num_tokens` and whisper's window arithmetic, on modules
built on the meta device (no memory, no weights). Long, silent and too-long media follow one
policy (omni/model/media_policy.py): cut with a note, or refused with one line. Torch-only: shipped
as an export's remote code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from open_clip.pretrained import get_pretrained_cfg, is_pretrained_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from encoders.anyres import AnyResConfig, anyres_tiles
from encoders.audio import AudioEncoder, AudioTowerConfig
from encoders.image import ImageEncoder
from encoders.video import VideoSamplingConfig
from omni.errors import SampleError
from omni.modalities import MODALITIES
from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE, expand_placeholders
from omni.model.media_policy import MediaPolicy, PromptTooLong
from projectors import build_projector

AUDIO_DIMS = ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")


@dataclass
class Example:
    input_ids: torch.Tensor      # [L]
    labels: torch.Tensor         # [L]
    media: MediaBatch
    notes: list[str] = field(default_factory=list)  # what the media policy did, for the user


def _meta_projector(spec: dict):
    """A projector for its `num_tokens` rule only: built on the meta device, no memory."""
    with torch.device("meta"):
        return build_projector(spec["kind"], in_dim=1, out_dim=1, **spec.get("options", {}))


def _image_geometry(image_cfg) -> dict:
    """image_size, num_patches and the eval preprocessing of the tower `image_cfg` builds (what
    `ImageEncoder` resolves, including a pretrained tag's normalisation), without weights."""
    with torch.device("meta"):
        tower = ImageEncoder(dataclasses.replace(image_cfg, pretrained=None))
    preprocess = dict(tower.preprocess_cfg)
    name, tag = image_cfg.open_clip_model, image_cfg.pretrained
    if name and tag and is_pretrained_cfg(name, tag):  # open_clip applies the tag's own settings
        preprocess = {**merge_preprocess_dict(PreprocessCfg(), get_pretrained_cfg(name, tag)), "size": tower.image_size}
    return {"preprocess": preprocess, "image_size": tower.image_size, "num_patches": tower.num_patches}


class OmniProcessor:
    def __init__(self, tokenizer, image_config: dict, video_config: dict, audio_config: dict, token_config: dict):
        self.tokenizer = tokenizer
        self.image_config, self.video_config = dict(image_config), dict(video_config)
        self.audio_config, self.token_config = dict(audio_config), dict(token_config)
        preprocess = {k: tuple(v) if isinstance(v, list) else v for k, v in self.image_config["preprocess"].items()}
        self._transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)  # = ImageEncoder's
        self._anyres = AnyResConfig(**self.image_config["anyres"])
        self._video = VideoSamplingConfig(fps=self.video_config["fps"], max_frames=self.video_config["max_frames"])
        with torch.device("meta"):  # windowing and log-mel need no weights
            self._audio = AudioEncoder(AudioTowerConfig(**{k: self.audio_config[k] for k in AUDIO_DIMS}))
        self._audio_projector = _meta_projector(self.audio_config["projector"])
        self.policy = MediaPolicy(self._audio.window_samples,
                                  int(self.audio_config.get("max_windows", AudioTowerConfig.max_windows)),
                                  self._video)
        num_patches = self.image_config["num_patches"]
        self.image_tokens = _meta_projector(self.image_config["projector"]).num_tokens(num_patches)  # per tile
        self.frame_tokens = _meta_projector(self.video_config["projector"]).num_tokens(num_patches)  # per frame
        self.placeholders = {m: self.token_config["placeholders"][m] for m in MODALITIES}
        # special tokens other than the placeholders (<|im_start|>, <|im_end|>, pad, ...): typed into a
        # message they would be parsed as chat-template control tokens (a user could write a new turn)
        self.control_tokens = sorted(t for t in tokenizer.all_special_tokens if t not in self.placeholders.values())
        self.token_ids = {m: int(self.token_config["token_ids"][m]) for m in MODALITIES}
        self.max_length = int(self.token_config["max_length"])

    @classmethod
    def from_config(cls, cfg, tokenizer, token_ids: dict[str, int], max_length: int | None = None) -> "OmniProcessor":
        """The processor of a model config (omni.presets.ModelConfig) whose placeholder tokens are
        `token_ids` in `tokenizer`; `max_length` defaults to the LM's max_position_embeddings."""
        spec = {m: {"kind": cfg.projectors[m].kind, "options": dict(cfg.projectors[m].options)} for m in MODALITIES}
        return cls(
            tokenizer,
            image_config={**_image_geometry(cfg.image), "anyres": dataclasses.asdict(cfg.anyres),
                          "projector": spec["image"]},
            video_config={**dataclasses.asdict(cfg.video), "projector": spec["video"]},
            audio_config={**{k: getattr(cfg.audio, k) for k in AUDIO_DIMS}, "max_windows": cfg.audio.max_windows,
                          "projector": spec["audio"]},
            token_config={"placeholders": {m: tokenizer.convert_ids_to_tokens(int(token_ids[m])) for m in MODALITIES},
                          "token_ids": {m: int(token_ids[m]) for m in MODALITIES},
                          "max_length": max_length or cfg.llm.hf_config["max_position_embeddings"]},
        )

    def configs(self) -> dict:
        """The four dicts this processor is built from (an export's processor_config.json)."""
        return {"image_config": dict(self.image_config), "video_config": dict(self.video_config),
                "audio_config": dict(self.audio_config), "token_config": dict(self.token_config)}

    # ---- media ----------------------------------------------------------------------------
    def pixels(self, images: list) -> torch.Tensor:
        """open_clip's eval transform of the image tower -> float32 [N, 3, S, S]."""
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def log_mel(self, window: np.ndarray) -> torch.Tensor:
        """Whisper's log-mel of one audio window (zero-padded to the window) -> [n_mels, 2*n_ctx]."""
        return self._audio.log_mel(window)

    def _images(self, images: list, blank: bool):
        """AnyRes: each image becomes [thumbnail] + grid tiles, each tile through the tower."""
        tiles, counts = [], []
        for im in images:
            parts, _ = anyres_tiles(im.convert("RGB"), self.image_config["image_size"], self._anyres)
            tiles.extend(parts)
            counts.append(len(parts))
        pixels = self.pixels(tiles)
        return (torch.zeros_like(pixels) if blank else pixels), counts

    def _videos(self, videos: list, blank: bool, notes: list[str]):
        frames, counts = [], []
        for i, v in enumerate(videos):
            clip, said = self.policy.frames(v, f"video {i + 1}")
            notes += said
            pixels = self.pixels(clip)
            frames.append(torch.zeros_like(pixels) if blank else pixels)
            counts.append(len(clip))
        return torch.cat(frames), counts

    def _audios(self, audios: list, blank: bool, notes: list[str]):
        mels, valid, tokens = [], [], []
        for i, wav in enumerate(audios):
            wav, said = self.policy.audio(wav, f"audio {i + 1}")  # silence is refused before blanking
            notes += said
            if blank:
                wav = np.zeros_like(wav)
            n = 0
            for window in self._audio.split_windows(wav):
                mels.append(self.log_mel(window))
                v = self._audio.valid_frames(len(window))
                valid.append(v)
                n += self._audio_projector.num_tokens(v)
            tokens.append(n)
        return torch.stack(mels), valid, tokens

    def check_placeholders(self, texts: list[str], media: dict[str, list]) -> None:
        """Every modality has exactly one medium per placeholder in `texts`."""
        unknown = set(media) - set(MODALITIES)
        if unknown:
            raise SampleError(f"media: unknown modality {sorted(unknown)}")
        for modality, ph in self.placeholders.items():
            n_ph, n_media = sum(t.count(ph) for t in texts), len(media.get(modality) or [])
            if n_ph != n_media:
                raise SampleError(f"{modality}: {n_ph} '{ph}' placeholder(s) in the text but {n_media} item(s)")

    def refuse_control_tokens(self, messages: list[dict]) -> None:
        """Message contents hold text and placeholders only: a control token typed into one is refused
        (SampleError naming the turn) rather than read as a turn boundary or a role."""
        for i, m in enumerate(messages):
            content = m.get("content", "")
            found = [t for t in self.control_tokens if t in content]
            if found:
                raise SampleError(f"message {i} ({m.get('role', '?')}): contains the chat control token(s) {found}; "
                                  "remove them from the text")

    def media(self, media: dict[str, list], blank: bool = False,
              notes: list[str] | None = None) -> tuple[MediaBatch, dict[str, list[int]]]:
        """(preprocessed media, placeholder tokens per medium) of `media` (modality -> list in
        placeholder order), after the media policy (long media cut, silence refused: MediaRefused);
        what the policy did is appended to `notes`. `blank` zeroes media content (the control that
        shows answers come from the media)."""
        notes = [] if notes is None else notes
        batch = MediaBatch()
        counts: dict[str, list[int]] = {}
        if media.get("image"):
            batch.image, batch.image_tiles = self._images(media["image"], blank)
            counts["image"] = [self.image_tokens * t for t in batch.image_tiles]
        if media.get("video"):
            batch.video, batch.video_frames = self._videos(media["video"], blank, notes)
            counts["video"] = [self.frame_tokens * f for f in batch.video_frames]
        if media.get("audio"):
            batch.audio, batch.audio_valid, counts["audio"] = self._audios(media["audio"], blank, notes)
        return batch, counts

    def expand(self, ids: list[int], targets: list[int], counts: dict[str, list[int]],
               seen: dict[str, int] | None = None) -> tuple[list[int], list[int]]:
        """Placeholders expanded to their media's token counts, labels (see fusion.expand_placeholders).
        A sequence longer than max_length is refused (PromptTooLong) before any model runs."""
        out_ids, out_labels = expand_placeholders(ids, targets, self.token_ids, counts, seen)
        if len(out_ids) > self.max_length:
            used = {m: sum(c) for m, c in counts.items() if sum(c)}
            media = ", ".join(f"{m} {n}" for m, n in used.items())
            raise PromptTooLong(
                f"sequence of {len(out_ids)} tokens exceeds max_length {self.max_length} (the model's context)"
                + (f"; the media take {sum(used.values())} of them ({media})" if used else "")
                + ": send fewer or shorter media or a shorter text")
        return out_ids, out_labels

    # ---- text -----------------------------------------------------------------------------
    def __call__(self, messages: list[dict], media: dict[str, list] | None = None,
                 add_generation_prompt: bool = False, blank: bool = False) -> Example:
        """`media` maps modality -> list in placeholder order: PIL images, videos (bytes/path or a
        list of PIL frames), audio waveforms (float32 mono 16 kHz). `blank`: see `media`. The
        example's `notes` say what the media policy did (a clip cut, frames spread); MediaRefused
        and PromptTooLong (SampleErrors) carry one line for the user."""
        media = {k: v for k, v in (media or {}).items() if v}
        self.refuse_control_tokens(messages)
        self.check_placeholders(["".join(m.get("content", "") for m in messages)], media)
        notes: list[str] = []
        batch, counts = self.media(media, blank, notes)
        enc = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=True,
        )
        out_ids, out_labels = self.expand(enc["input_ids"], enc["assistant_masks"], counts)
        return Example(torch.tensor(out_ids), torch.tensor(out_labels), batch, notes)


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


def last_span(labels: torch.Tensor) -> torch.Tensor:
    """Keep only the last run of label tokens (the final assistant reply); the rest becomes IGNORE."""
    on = (labels != IGNORE).nonzero().flatten()
    if len(on) == 0:
        return labels
    start = int(on[-1])
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    out = labels.clone()
    out[:start] = IGNORE
    return out
