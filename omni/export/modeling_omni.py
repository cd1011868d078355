"""Hugging Face model of an exported omni model (remote code: ships inside every export).

`OmniForCausalLM` is the same computation as `omni.model.omni_model.OmniModel`: both are built
and run by `omni.model.composition.OmniComposition`, with the same parameter names (so the
exported weights are OmniModel's state dict as is):
- `encoders.image`: encoders.ImageEncoder (open_clip tower -> patch tokens); video frames too.
- `encoders.audio`: encoders.AudioEncoder (whisper encoder over log-mel windows).
- `projectors.{image,video,audio}`: projectors.build_projector (2x2-pool MLP, Conv-GMLP).
- `llm`: `AutoModelForCausalLM.from_config(config.text_config)`, fed `inputs_embeds`; with
  `config.norm_head` its lm_head is Baichuan 2's NormHead (rows L2-normalised at every forward,
  the raw weight is what is stored), and `config.max_z_loss` adds the max-z loss when labels
  are given, as in training.
- Fusion: each modality's projected tokens replace its placeholder tokens in order
  (omni.model.fusion.scatter_features; a count mismatch raises).

`omni export` copies this file with the imports of `encoders`, `projectors` and `omni.*` leaf
modules rewritten to relative imports of flattened copies of those modules
(omni/export/remote_code.py), so the consumer needs torch, transformers, open_clip, whisper and
PyAV, but not omni.

Attention follows transformers' backend conventions (docs/serving.md): the LM's layers call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, `_supports_attention_backend` is set, and
`forward` hands every extra keyword argument to the LM, so they reach that attention function (an
engine's own kernel registered with `AttentionInterface.register`, as vLLM's Transformers backend does).

`generate` embeds the prompt (media included) once and hands `inputs_embeds` to the LM's own
`generate`, exactly as OmniModel.generate does; it returns prompt + new tokens, the usual
transformers convention for decoder-only models.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from encoders.audio import AudioTowerConfig
from encoders.image import ImageTowerConfig
from omni.hf.configuration_omni import OmniConfig
from omni.model.batch import MediaBatch
from omni.model.composition import OmniComposition


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


class OmniForCausalLM(OmniPreTrainedModel, GenerationMixin, OmniComposition):
    def __init__(self, config: OmniConfig):
        super().__init__(config)
        vc, ac = config.vision_config, config.audio_config
        image_cfg = ImageTowerConfig(open_clip_model=vc.open_clip_model, vision_cfg=vc.vision_cfg,
                                     feature_layer=vc.feature_layer)
        audio_cfg = AudioTowerConfig(n_mels=ac.n_mels, n_ctx=ac.n_ctx, n_state=ac.n_state,
                                     n_head=ac.n_head, n_layer=ac.n_layer)
        token_ids = {"image": config.image_token_id, "video": config.video_token_id, "audio": config.audio_token_id}
        self.compose(AutoModelForCausalLM.from_config(config.text_config), image_cfg, audio_cfg,
                     config.projectors, token_ids, config.norm_head)
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

    # ---- the omni computation (omni/model/composition.py) -------------------------------------
    @staticmethod
    def media_batch(pixel_values=None, image_tiles=None, pixel_values_videos=None, video_frames=None,
                    input_features=None, audio_valid=None) -> MediaBatch:
        """The processor's outputs as the composition's MediaBatch."""
        as_list = lambda t: [] if t is None else [int(v) for v in t]  # noqa: E731
        return MediaBatch(image=pixel_values, image_tiles=as_list(image_tiles), video=pixel_values_videos,
                          video_frames=as_list(video_frames), audio=input_features, audio_valid=as_list(audio_valid))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                pixel_values=None, image_tiles=None, pixel_values_videos=None, video_frames=None,
                input_features=None, audio_valid=None, **kwargs):
        """`image_tiles` / `video_frames` (tiles per image, frames per video) are bookkeeping
        from the processor: the placeholder counts already encode them. Other keyword arguments
        (cache, use_cache, num_items_in_batch, ...) go to the LM."""
        if inputs_embeds is None:
            media = self.media_batch(pixel_values, image_tiles, pixel_values_videos, video_frames,
                                     input_features, audio_valid)
            inputs_embeds = self.embed(input_ids, media)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       labels=labels, **kwargs)
        return self.add_max_z_loss(out, labels, self.config.max_z_loss, kwargs.get("num_items_in_batch"))

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_tiles=None,
                 pixel_values_videos=None, video_frames=None, input_features=None, audio_valid=None,
                 generation_config=None, **kwargs):
        """Prompt + continuation ids (left-pad batched prompts). Media enter once, in the prompt
        embeddings; the LM's `generate` continues from them with its KV cache."""
        media = self.media_batch(pixel_values, image_tiles, pixel_values_videos, video_frames,
                                 input_features, audio_valid)
        embeds = self.embed(input_ids, media)
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)  # generation settings in, the rest returned
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                generation_config=generation_config, **model_kwargs)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out
