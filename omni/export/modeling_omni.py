"""Hugging Face model of an exported omni model (remote code: ships inside every export).

`OmniForCausalLM` is the same computation as `omni.model.OmniModel`, built from the same
modules, with the same parameter names (so the exported weights are OmniModel's state dict
as is):
- `encoders.image`: encoders.ImageEncoder (open_clip tower -> patch tokens); video frames too.
- `encoders.audio`: encoders.AudioEncoder (whisper encoder over log-mel windows).
- `projectors.{image,video,audio}`: projectors.build_projector (2x2-pool MLP, Conv-GMLP).
- `llm`: `AutoModelForCausalLM.from_config(config.text_config)`, fed `inputs_embeds`; with
  `config.norm_head` its lm_head is Baichuan 2's NormHead (rows L2-normalised at every forward,
  the raw weight is what is stored), and `config.max_z_loss` adds the max-z loss when labels
  are given, as in training.
- Fusion: each modality's projected tokens replace its placeholder tokens in order
  (omni.fusion.scatter_features; a count mismatch raises).

`omni export` copies this file with the imports of `encoders`, `projectors` and `omni.*` leaf
modules rewritten to relative imports of flattened copies of those modules
(omni/hf/remote_code.py), so the consumer needs torch, transformers, open_clip, whisper and
PyAV, but not omni.

`generate` embeds the prompt (media included) once and hands `inputs_embeds` to the LM's own
`generate`, exactly as OmniModel.generate does; it returns prompt + new tokens, the usual
transformers convention for decoder-only models.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from encoders.audio import AudioEncoder, AudioTowerConfig
from encoders.image import ImageEncoder, ImageTowerConfig
from omni.hf.configuration_omni import OmniConfig
from omni.model.baichuan2 import max_z_loss, use_norm_head
from omni.model.fusion import scatter_features
from projectors import build_projector

MODALITIES = ("image", "video", "audio")


class OmniPreTrainedModel(PreTrainedModel):
    config_class = OmniConfig
    config: OmniConfig
    base_model_prefix = "omni"  # no attribute of that name: checkpoint keys are never re-prefixed
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = False
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class OmniForCausalLM(OmniPreTrainedModel, GenerationMixin):
    def __init__(self, config: OmniConfig):
        super().__init__(config)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        if config.norm_head:
            use_norm_head(self.llm)
        vc, ac = config.vision_config, config.audio_config
        image_cfg = ImageTowerConfig(open_clip_model=vc.open_clip_model, vision_cfg=vc.vision_cfg,
                                     feature_layer=vc.feature_layer)
        audio_cfg = AudioTowerConfig(n_mels=ac.n_mels, n_ctx=ac.n_ctx, n_state=ac.n_state,
                                     n_head=ac.n_head, n_layer=ac.n_layer)
        self.encoders = nn.ModuleDict({"image": ImageEncoder(image_cfg), "audio": AudioEncoder(audio_cfg)})
        image_dim = self.encoders["image"].out_dim
        in_dims = {"image": image_dim, "video": image_dim, "audio": self.encoders["audio"].out_dim}
        hidden = config.text_config.hidden_size
        self.projectors = nn.ModuleDict({
            m: build_projector(config.projectors[m]["kind"], in_dim=in_dims[m], out_dim=hidden,
                               **config.projectors[m].get("options", {}))
            for m in MODALITIES
        })
        self.token_ids = {"image": config.image_token_id, "video": config.video_token_id,
                          "audio": config.audio_token_id}
        self.post_init()

    # ---- transformers plumbing ------------------------------------------------------------
    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

    def _init_weights(self, module):
        # transformers calls this for modules whose weights a checkpoint did not provide (and for a
        # model built from a config). Encoders and projectors keep their constructors' init; the
        # LM is a PreTrainedModel of its own, so transformers dispatches its modules to its own
        # `_init_weights` (rotary buffers included) and they never reach this method.
        pass

    # ---- the omni computation ---------------------------------------------------------------
    def encode(self, modality: str, media: torch.Tensor, audio_valid=None) -> torch.Tensor:
        """Projected tokens of every medium of `modality`, flattened to [n, D] (OmniModel.encode)."""
        if modality in ("image", "video"):
            feats = self.projectors[modality](self.encoders["image"](media))
            return feats.reshape(-1, feats.shape[-1])
        if modality == "audio":
            encoder = self.encoders["audio"]
            feats = self.projectors["audio"](encoder(media.to(encoder.encoder.conv1.weight.dtype)))
            valid = [int(v) for v in audio_valid]
            if len(valid) != feats.shape[0]:
                raise ValueError(f"audio: {feats.shape[0]} log-mel windows but {len(valid)} audio_valid entries")
            return torch.cat([feats[w, : self.projectors["audio"].num_tokens(v)] for w, v in enumerate(valid)])
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def embed(self, input_ids, pixel_values=None, pixel_values_videos=None, input_features=None,
              audio_valid=None) -> torch.Tensor:
        """Text embeddings with every placeholder replaced by its medium's tokens (OmniModel.embed)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        media = {"image": pixel_values, "video": pixel_values_videos, "audio": input_features}
        for modality in MODALITIES:
            tensor = media[modality]
            if tensor is None:
                features = embeds.new_zeros(0, embeds.shape[-1])
            else:
                features = self.encode(modality, tensor, audio_valid)
            embeds = scatter_features(embeds, input_ids, self.token_ids[modality], features, modality)
        return embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                pixel_values=None, image_tiles=None, pixel_values_videos=None, video_frames=None,
                input_features=None, audio_valid=None, **kwargs):
        """`image_tiles` / `video_frames` (tiles per image, frames per video) are bookkeeping
        from the processor: the placeholder counts already encode them. Other keyword arguments
        (cache, use_cache, num_items_in_batch, ...) go to the LM."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, pixel_values_videos, input_features, audio_valid)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       labels=labels, **kwargs)
        if labels is not None and self.config.max_z_loss > 0:  # normalised like the LM's cross-entropy
            out.loss = out.loss + max_z_loss(out.logits, labels, self.config.max_z_loss,
                                             kwargs.get("num_items_in_batch"))
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_tiles=None,
                 pixel_values_videos=None, video_frames=None, input_features=None, audio_valid=None,
                 generation_config=None, **kwargs):
        """Prompt + continuation ids (left-pad batched prompts). Media enter once, in the prompt
        embeddings; the LM's `generate` continues from them with its KV cache."""
        embeds = self.embed(input_ids, pixel_values, pixel_values_videos, input_features, audio_valid)
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)  # generation settings in, the rest returned
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                generation_config=generation_config, **model_kwargs)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out
