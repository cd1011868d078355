"""omni <-> Hugging Face export: configs both ways, weight keys.

Weight keys: the identity. The exported `OmniForCausalLM` holds its modules under the same names
as `OmniModel` (`llm.*`, `encoders.image.*`, `encoders.audio.*`, `projectors.{image,video,audio}.*`),
so the export's safetensors hold `OmniModel.state_dict()` as is, and loading an export back into
omni is a plain strict `load_state_dict`. One exception: when the LM ties its input and output
embeddings, `llm.lm_head.weight` is not stored (transformers re-ties it from
`llm.model.embed_tokens.weight`, as for any tied LM).

Config: `ModelConfig` (omni/presets.py) <-> `OmniConfig` (configuration_omni.py):

| ModelConfig                                 | OmniConfig (config.json)                              |
|---------------------------------------------|-------------------------------------------------------|
| image.{open_clip_model,vision_cfg,feature_layer} | vision_config.{same}                              |
| audio.{n_mels,n_ctx,n_state,n_head,n_layer,max_windows} | audio_config.{same}                       |
| the LM's actual transformers config          | text_config                                          |
| projectors[m].{kind,options}                | projectors[m].{kind,options}                          |
| llm.norm_head, llm.max_z_loss               | norm_head, max_z_loss                                 |
| video.{fps,max_frames}, anyres.*            | video_config, anyres_config                           |
| token ids of <image>/<video>/<audio>        | image_token_id, video_token_id, audio_token_id        |
| name, llm.pretrained, image.pretrained, audio.checkpoint, tokenizer | origin.{preset, llm, image, audio, tokenizer} |
| talker.* (when talker.enabled)             | talker_config (every field but `enabled`; null: no talker) |

`origin` is provenance (where the initial weights came from); the HF model never reads it, and
`omni.model.load.load_model` keeps it as metadata without loading anything from it: all weights come from
the export. `llm.attn_implementation` is a runtime choice, not stored (transformers:
`attn_implementation=`; omni: the `llm.attn_implementation` model override).
"""
from __future__ import annotations

import dataclasses

from omni.hf.configuration_omni import OmniConfig
from omni.modalities import MODALITIES
from omni.presets import ModelConfig, model_config_from_dict

AUTO_MAP = {
    "AutoConfig": "configuration_omni.OmniConfig",
    "AutoModel": "modeling_omni.OmniForCausalLM",
    "AutoModelForCausalLM": "modeling_omni.OmniForCausalLM",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_omni.OmniProcessor"}  # its settings: omni.model.processor
_AUDIO_DIMS = ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")


def hf_config_from_model_config(cfg: ModelConfig, text_config: dict, token_ids: dict[str, int],
                                dtype) -> OmniConfig:
    """The OmniConfig of a model: its ModelConfig, its LM's actual transformers config (as a dict),
    its placeholder token ids and the weights' dtype."""
    config = OmniConfig(
        vision_config={"open_clip_model": cfg.image.open_clip_model, "vision_cfg": cfg.image.vision_cfg,
                       "feature_layer": cfg.image.feature_layer},
        audio_config={**{k: getattr(cfg.audio, k) for k in _AUDIO_DIMS}, "max_windows": cfg.audio.max_windows},
        text_config=dict(text_config),
        projectors={m: {"kind": cfg.projectors[m].kind, "options": dict(cfg.projectors[m].options)}
                    for m in MODALITIES},
        image_token_id=token_ids["image"],
        video_token_id=token_ids["video"],
        audio_token_id=token_ids["audio"],
        norm_head=cfg.llm.norm_head,
        max_z_loss=cfg.llm.max_z_loss,
        video_config=dataclasses.asdict(cfg.video),
        anyres_config=dataclasses.asdict(cfg.anyres),
        origin={"preset": cfg.name, "llm": cfg.llm.pretrained, "image": cfg.image.pretrained,
                "audio": cfg.audio.checkpoint, "tokenizer": cfg.tokenizer},
        talker_config=_talker_config(cfg),
    )
    config.architectures = ["OmniForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    return config


def _talker_config(cfg: ModelConfig) -> dict | None:
    if not cfg.talker.enabled:
        return None
    return {k: v for k, v in dataclasses.asdict(cfg.talker).items() if k != "enabled"}


def model_config_from_hf(config: dict) -> tuple[ModelConfig, dict, dict[str, int]]:
    """(ModelConfig, the LM's transformers config dict, placeholder token ids) from a config.json dict."""
    origin = config.get("origin") or {}
    text = {k: v for k, v in config["text_config"].items()
            if k not in ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")}
    vision = config["vision_config"]
    data = {
        "name": origin.get("preset") or "export",
        "llm": {"hf_config": dict(text), "pretrained": origin.get("llm"), "norm_head": config.get("norm_head", False),
                "max_z_loss": config.get("max_z_loss", 0.0)},
        "image": {"open_clip_model": vision.get("open_clip_model"), "vision_cfg": vision.get("vision_cfg"),
                  "feature_layer": vision.get("feature_layer"), "pretrained": origin.get("image")},
        "audio": {**{k: config["audio_config"][k] for k in _AUDIO_DIMS}, "checkpoint": origin.get("audio"),
                  **({"max_windows": config["audio_config"]["max_windows"]} if "max_windows" in config["audio_config"] else {})},
        "video": config["video_config"],
        "anyres": config["anyres_config"],
        "projectors": config["projectors"],
        "tokenizer": origin.get("tokenizer") or "export",
        **({"talker": {"enabled": True, **config["talker_config"]}} if config.get("talker_config") else {}),
    }
    token_ids = {m: config[f"{m}_token_id"] for m in MODALITIES}
    return model_config_from_dict(data), text, token_ids
