"""Hugging Face config of an exported omni model (remote code: ships inside every export).

`OmniConfig` nests three sub-configs, like transformers' LLaVA:
- `vision_config` (`OmniVisionConfig`): the open_clip image tower (a registry name or a
  `vision_cfg` dict of CLIPVisionCfg fields, and `feature_layer`); video frames use it too.
- `audio_config` (`OmniAudioConfig`): the whisper encoder dims.
- `text_config`: the causal LM's own transformers config (any AutoModelForCausalLM type).
Plus the projectors (`{modality: {"kind", "options"}}`), the placeholder token ids, the Baichuan 2
options (`norm_head`, `max_z_loss`), and the processor-side settings the model keeps for a
round trip back into omni (`video_config`, `anyres_config`), provenance (`origin`) and, for a
model that speaks, its talker (`talker_config`).

This file imports only transformers: the consumer of an export does not have omni installed.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

MODEL_TYPE = "omni_mllm"


class OmniVisionConfig(PreTrainedConfig):
    """encoders.ImageTowerConfig without `pretrained` (the export carries the weights)."""

    model_type = "omni_mllm_vision"
    base_config_key = "vision_config"

    open_clip_model: str | None = None
    vision_cfg: dict | None = None
    feature_layer: int | None = None


class OmniAudioConfig(PreTrainedConfig):
    """encoders.AudioTowerConfig without `checkpoint` (whisper large-v3 dims by default)."""

    model_type = "omni_mllm_audio"
    base_config_key = "audio_config"

    n_mels: int = 128
    n_ctx: int = 1500
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    max_windows: int = 8  # the most encoder windows of one clip the model reads (the processor cuts the rest)


def _default_projectors() -> dict:
    return {
        "image": {"kind": "mlp", "options": {"pool": True}},
        "video": {"kind": "mlp", "options": {"pool": True}},
        "audio": {"kind": "conv_gmlp", "options": {"stride": 4}},
    }


class OmniConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": OmniVisionConfig,
        "audio_config": OmniAudioConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projectors: dict | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    norm_head: bool = False          # Baichuan 2 NormHead: logits = h @ normalize(W_lm_head).T
    max_z_loss: float = 0.0          # Baichuan 2 max-z loss coefficient (training only)
    video_config: dict | None = None   # {"fps", "max_frames"} (the processor samples frames)
    anyres_config: dict | None = None  # {"max_tiles", "thumbnail"} (the processor tiles images)
    origin: dict | None = None  # provenance: omni preset, initial LM/tower weights, tokenizer spec
    # speech out: the talker's dims, codec ("tiny": tiny_codec.* files beside the weights; "mimi":
    # `codec_pretrained`, a transformers MimiModel) and max_frames; None: text out only
    talker_config: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # the export's file hashes (omni's loader checks them): not carried into a re-save of other weights
        kwargs.pop("weights_sha256", None)
        if self.projectors is None:
            self.projectors = _default_projectors()
        if self.video_config is None:
            self.video_config = {"fps": 1.0, "max_frames": 48}
        if self.anyres_config is None:
            self.anyres_config = {"max_tiles": 0, "thumbnail": True}
        super().__post_init__(**kwargs)
        # the LM decides about tying; mirrored here as LLaVA does for tools that read the top config
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
