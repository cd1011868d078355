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

Speech out (`config.talker_config`, docs/speech_out.md): `talker` is omni.speech.talker.Talker under
the same parameter names, and `from_pretrained` loads its codec (the tiny codec's fitted codebooks,
decoded with librosa, or transformers' MimiModel by name). `speech_codes` / `generate_speech` speak a
reply as `omni chat --speak` does (omni/model/talking.py: the thinker teacher-forced on the
conversation with its answer, the talker greedy).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import cached_file

from encoders.audio import AudioTowerConfig
from encoders.image import ImageTowerConfig
from omni.hf.configuration_omni import OmniConfig
from omni.model.batch import MediaBatch
from omni.model.composition import OmniComposition
from omni.model.processor import last_span
from omni.model.talking import speak, thinker_states
from omni.speech.mimi_codec import MimiCodec
from omni.speech.talker import Talker, TalkerConfig
from omni.speech.tiny_codebook import CODEBOOKS_FILE, CONFIG_FILE, TinyCodebooks, TinyCodecConfig

HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def load_codec(talker: dict, fetch):
    """The talker's codec from `talker_config`: Mimi by name, or the tiny codec's two files
    (`fetch(name)`: a local path to that file of the export)."""
    if talker["codec"] == "mimi":
        codec = MimiCodec(talker["codec_pretrained"], talker["codebooks"])
    else:
        config = TinyCodecConfig(**json.loads(Path(fetch(CONFIG_FILE)).read_text()))
        codec = TinyCodebooks(config, load_file(fetch(CODEBOOKS_FILE))["centroids"])
    if (codec.codebooks, codec.codebook_size) != (talker["codebooks"], talker["codebook_size"]):
        raise ValueError(f"the codec has {codec.codebooks} codebooks of {codec.codebook_size}, the talker speaks "
                         f"{talker['codebooks']} of {talker['codebook_size']}: the export is inconsistent")
    return codec


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
        talker = config.talker_config  # speech out, as OmniModel builds it (omni/model/speech.py)
        self.talker = Talker(TalkerConfig(**{f.name: talker[f.name] for f in dataclasses.fields(TalkerConfig)}),
                             config.text_config.hidden_size) if talker else None
        self.codec = None  # the talker's codec: `from_pretrained` loads it
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, then the talker's codec when the model speaks: the tiny
        codec's files from the same folder or Hub repo (same download options), or the transformers
        Mimi that `talker_config.codec_pretrained` names."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        if model.talker is not None:
            hub = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
            model.codec = load_codec(model.config.talker_config,
                                     lambda name: cached_file(pretrained_model_name_or_path, name, **hub))
        return loaded

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

    # ---- speech out (omni/model/talking.py) -----------------------------------------------------
    @torch.no_grad()
    def speech_codes(self, input_ids, attention_mask, labels, pixel_values=None, image_tiles=None,
                     pixel_values_videos=None, video_frames=None, input_features=None, audio_valid=None,
                     max_frames=None) -> list[torch.Tensor]:
        """The talker's greedy codec codes [codebooks, frames] for each row's last reply: the
        processor's output (`return_labels=True`) for the conversation that ends with the answer as
        an assistant turn. The thinker runs teacher-forced on it and hands the talker its states at
        the reply's tokens, as in training; speech stops where the talker says so, or at `max_frames`
        (default: `talker_config.max_frames`)."""
        if self.talker is None:
            raise ValueError("this model has no talker (config.json talker_config is null): it answers in text only")
        media = self.media_batch(pixel_values, image_tiles, pixel_values_videos, video_frames,
                                 input_features, audio_valid)
        labels = torch.stack([last_span(row) for row in labels])  # earlier replies are context
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left or right padding alike
        states = thinker_states(self, input_ids, attention_mask, labels, media, positions)
        return speak(self, states, max_frames or self.config.talker_config["max_frames"])

    def generate_speech(self, input_ids, attention_mask, labels, max_frames=None, **media):
        """Each row's last reply spoken (inputs as for `speech_codes`): (a float32 mono wave per row,
        the codec's sample rate)."""
        if self.codec is None:
            raise ValueError("no codec loaded: load the model with from_pretrained, which reads it")
        codes = self.speech_codes(input_ids, attention_mask, labels, max_frames=max_frames, **media)
        return [self.codec.decode(c.cpu()) for c in codes], self.codec.sample_rate

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
