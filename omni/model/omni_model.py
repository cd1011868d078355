"""OmniModel: encoders -> projectors -> causal LLM, the Baichuan-Omni composition.

Architectural choices, all set by the preset (omni/presets.py):
- LLM: any transformers AutoModelForCausalLM (Qwen2-7B in the 7B preset, a 2-layer Qwen2 in tiny),
  fed `inputs_embeds` so no model class is patched or subclassed.
- Image: open_clip tower patch tokens -> 2x2 pool + 2-layer MLP projector.
- Video: frames sampled by the processor (1 fps, capped) through the *same* image tower, then a
  separate video projector; a video's tokens are its frames' tokens in time order.
- Audio: whisper encoder over 30 s log-mel windows (50 frames/s) -> Conv-GMLP projector
  (stride 4 -> 12.5 tokens/s); only the tokens covering real audio are kept.
- Fusion: each modality's tokens are scattered into that modality's placeholder positions
  (omni/fusion.py); counts must match exactly.
Labels at media and prompt positions are -100 (set by the processor).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from encoders import AudioEncoder, ImageEncoder
from omni.config import ConfigError, apply_overrides
from omni.model.baichuan2 import max_z_loss, use_norm_head
from omni.model.batch import MediaBatch
from omni.model.fusion import scatter_features
from omni.presets import (
    MODALITIES,
    ModelConfig,
    model_config_from_dict,
    model_config_to_dict,
)
from omni.tokenizer import load_tokenizer, placeholder_ids
from projectors import build_projector

WEIGHTS = "model.safetensors"
CONFIG = "omni_config.json"
TOKENIZER_DIR = "tokenizer"


def attention_backend(requested: str) -> str:
    """"auto": FlashAttention-2 on a GPU where flash-attn is installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_llm(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    """The causal LM: pretrained weights by name/dir, or random init from the preset's sizes."""
    llm_cfg = cfg.llm
    attn = attention_backend(llm_cfg.attn_implementation)
    if pretrained and llm_cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(llm_cfg.pretrained, attn_implementation=attn, dtype=torch.float32)
    kwargs = dict(llm_cfg.hf_config)
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module, token_ids: dict[str, int], pretrained: bool = False):
        super().__init__()
        self.config = cfg
        self.llm = llm
        if cfg.llm.norm_head:
            use_norm_head(llm)
        self.token_ids = dict(token_ids)
        image_cfg, audio_cfg = cfg.image, cfg.audio
        if not pretrained:  # towers stay random-init unless the preset's weights are wanted
            image_cfg = dataclasses.replace(image_cfg, pretrained=None)
            audio_cfg = dataclasses.replace(audio_cfg, checkpoint=None)
        self.encoders = nn.ModuleDict({"image": ImageEncoder(image_cfg), "audio": AudioEncoder(audio_cfg)})
        hidden = llm.config.hidden_size
        in_dims = {"image": self.encoders["image"].out_dim, "video": self.encoders["image"].out_dim,
                   "audio": self.encoders["audio"].out_dim}
        self.projectors = nn.ModuleDict({
            m: build_projector(cfg.projectors[m].kind, in_dim=in_dims[m], out_dim=hidden,
                               **cfg.projectors[m].options)
            for m in MODALITIES
        })

    # ---- construction and persistence -------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer=None, pretrained: bool = True) -> tuple["OmniModel", object]:
        """Model + tokenizer for a preset; `pretrained` loads the preset's published weights."""
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        llm = build_llm(cfg, pretrained)
        if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer))
        return cls(cfg, llm, placeholder_ids(tokenizer), pretrained=pretrained), tokenizer

    def save_pretrained(self, out_dir: str | Path, tokenizer, state_dict: dict | None = None) -> None:
        """Write weights (safetensors), config and tokenizer into `out_dir` (callers make it atomic).
        `state_dict`: the full weights, when this module only holds a shard of them (FSDP2, ZeRO-3
        gather them first); written exactly as this module's own would be (tied weights once)."""
        from safetensors.torch import save_model

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self if state_dict is None else _Weights(state_dict), str(out_dir / WEIGHTS))
        meta = {"model": model_config_to_dict(self.config), "token_ids": self.token_ids,
                "llm_config": self.llm.config.to_dict()}
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
        tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, overrides: list[str] = (),
                        weights: bool = True) -> tuple["OmniModel", object]:
        """Load a model written by `save_pretrained` (a stage's `final/` folder). `overrides`
        (dotted key=value on the model config) switch options that keep the weights' shapes,
        e.g. `llm.norm_head=true`, `llm.max_z_loss=2e-4`, `video.max_frames=8`. `weights=False`:
        the architecture only (built under `torch.device("meta")` by ranks that receive the
        weights from rank 0, omni/train/engines.py)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / CONFIG).is_file() and (model_dir / "config.json").is_file():  # an `omni export` folder
            from omni.model.load import load_exported

            return load_exported(model_dir, overrides, weights)
        if not (model_dir / CONFIG).is_file() or not (model_dir / WEIGHTS).is_file():
            raise FileNotFoundError(f"{model_dir}: not an omni model folder (needs {CONFIG} and {WEIGHTS})")
        meta = json.loads((model_dir / CONFIG).read_text())
        if any(o.startswith(("llm.hf_config", "llm.pretrained")) for o in overrides):
            raise ConfigError(f"{model_dir}: the LLM's architecture is fixed once trained; "
                              "drop llm.hf_config/llm.pretrained overrides")
        where = f"{model_dir / CONFIG} with overrides"
        cfg = model_config_from_dict(apply_overrides(meta["model"], list(overrides), where=where))
        llm_cfg = dict(meta["llm_config"])
        hf_cfg = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
        llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attention_backend(cfg.llm.attn_implementation))
        model = cls(cfg, llm, meta["token_ids"], pretrained=False)
        try:
            if weights:
                model.load_weights(model_dir)
        except RuntimeError as e:
            raise ConfigError(f"{model_dir}: weights do not fit the model config{' after overrides ' + str(list(overrides)) if overrides else ''}: {e}") from None
        tokenizer = AutoTokenizer.from_pretrained(model_dir / TOKENIZER_DIR)
        return model, tokenizer

    def load_weights(self, model_dir: str | Path) -> None:
        """Weights of a `save_pretrained` folder into this model, in place (what a resume reads)."""
        from safetensors.torch import load_model

        load_model(self, str(Path(model_dir) / WEIGHTS))

    def enable_activation_checkpointing(self) -> None:
        """Recompute activations in backward: the LLM via transformers, the vision tower via open_clip."""
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        self.encoders["image"].visual.set_grad_checkpointing(True)

    # ---- token arithmetic shared with the processor ---------------------------------
    def image_tokens(self) -> int:
        return self.projectors["image"].num_tokens(self.encoders["image"].num_patches)

    def video_tokens(self, frames: int) -> int:
        return frames * self.projectors["video"].num_tokens(self.encoders["image"].num_patches)

    def audio_window_tokens(self, valid_frames: int) -> int:
        return self.projectors["audio"].num_tokens(valid_frames)

    # ---- forward ------------------------------------------------------------------------
    def encode(self, modality: str, media: MediaBatch) -> torch.Tensor:
        """Projected tokens of every medium of `modality` in the batch, flattened to [n, D]."""
        if modality == "image":
            feats = self.projectors["image"](self.encoders["image"](media.image))
            return feats.reshape(-1, feats.shape[-1])
        if modality == "video":
            feats = self.projectors["video"](self.encoders["image"](media.video))
            return feats.reshape(-1, feats.shape[-1])
        if modality == "audio":
            feats = self.projectors["audio"](self.encoders["audio"](media.audio))
            keep = [feats[w, : self.audio_window_tokens(v)] for w, v in enumerate(media.audio_valid)]
            return torch.cat(keep)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def blank_media(self, modality: str, device: torch.device | str = "cpu") -> MediaBatch:
        """One all-zero medium of `modality` (one tile, one frame, one audio window)."""
        size = self.encoders["image"].image_size
        if modality in ("image", "video"):
            pixels = torch.zeros(1, 3, size, size, device=device)
            return MediaBatch(image=pixels, image_tiles=[1]) if modality == "image" else \
                MediaBatch(video=pixels, video_frames=[1])
        if modality == "audio":
            cfg = self.encoders["audio"].cfg
            return MediaBatch(audio=torch.zeros(1, cfg.n_mels, 2 * cfg.n_ctx, device=device), audio_valid=[1])
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def embed(self, input_ids: torch.Tensor, media: MediaBatch | None, blank: tuple[str, ...] = ()) -> torch.Tensor:
        """Token embeddings with each modality's projected features in its placeholder positions.
        `blank`: modalities to run on `blank_media` when the batch has none of them, adding exactly
        0 to the result: engines that shard weights per module (FSDP2, ZeRO) need every rank to run
        the same modules, and every rank to hold a (zero) gradient for them, in every micro-batch."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        media = media or MediaBatch()
        for modality in MODALITIES:
            tensor = getattr(media, modality)
            if tensor is None:
                features = embeds.new_zeros(0, embeds.shape[-1])
                if modality in blank:
                    embeds = embeds + 0.0 * self.encode(modality, self.blank_media(modality, input_ids.device)).sum()
            else:
                features = self.encode(modality, media)
            embeds = scatter_features(embeds, input_ids, self.token_ids[modality], features, modality)
        return embeds

    def forward(self, input_ids, attention_mask=None, labels=None, media: MediaBatch | None = None,
                position_ids=None, num_items_in_batch: float | None = None, blank: tuple[str, ...] = ()):
        """`num_items_in_batch`: divide the summed token losses by this instead of taking the mean
        (the trainer passes the label tokens of the whole step, so accumulation and data
        parallelism weigh every token equally). `blank`: see `embed`."""
        embeds = self.embed(input_ids, media, blank)
        # no KV cache in a training/scoring forward: with one, transformers would not turn packed
        # position ids into a per-sample mask
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                       position_ids=position_ids, use_cache=False, **kwargs)
        if labels is not None and self.config.llm.max_z_loss > 0:
            out.loss = out.loss + max_z_loss(out.logits, labels, self.config.llm.max_z_loss, num_items_in_batch)
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media: MediaBatch | None = None, **kwargs):
        """Greedy/sampled continuation; returns only the new token ids (left-padded prompts)."""
        embeds = self.embed(input_ids, media)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


class _Weights(nn.Module):
    """A state dict posing as a module, for safetensors' `save_model` (which drops tied duplicates)."""

    def __init__(self, state_dict: dict):
        super().__init__()
        self._weights = state_dict

    def state_dict(self, *args, **kwargs):
        return dict(self._weights)
