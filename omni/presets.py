"""Model presets: the 7B model, its tiny twin and a `small` one come from one builder and differ by numbers only.

`tiny` is for tests (seconds on a CPU). `small` (112M parameters, an 88M LLM) keeps Qwen2-7B's
proportions: head_dim 128, 7 query heads per KV head, an MLP 5.3x the width, an untied head; its
audio tower has whisper-tiny's size. Its matmuls are shaped like the 7B's, so its throughput and
MFU on a CPU (bench/mfu.py) say something about the big model's. All use the same classes
(open_clip vision tower, whisper audio encoder, 2x2-pool MLP and Conv-GMLP projectors, a
Qwen2-style causal LM), the same special tokens and chat template, and the same patch-to-token
arithmetic.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from encoders import (
    AnyResConfig,
    AudioTowerConfig,
    ImageTowerConfig,
    VideoSamplingConfig,
)
from omni.config import ConfigError, apply_overrides, from_dict, to_dict
from omni.modalities import MODALITIES
from omni.tokenizer import TINY_TOKENIZER


@dataclass
class LLMConfig:
    # the architecture (omni/model/architecture.py): a named LLM's own config.json; `hf_config` is
    # the full transformers config (with model_type) of a random-init LLM, or, next to `pretrained`,
    # keys the checkpoint's config must agree with
    pretrained: str | None = None       # HF name or local folder: weights and config via from_pretrained
    hf_config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "auto"   # auto: flash_attention_2 on a GPU with flash-attn, else sdpa_varlen
    norm_head: bool = False             # Baichuan 2 NormHead (omni/model/baichuan2.py)
    max_z_loss: float = 0.0             # Baichuan 2 max-z loss coefficient (2e-4 in the report); 0: off

    def __post_init__(self):
        if self.max_z_loss < 0:
            raise ConfigError("llm.max_z_loss must be >= 0 (Baichuan 2 uses 2e-4)")


@dataclass
class ProjectorConfig:
    kind: str                           # a name in projectors.build_projector: "mlp", "conv_gmlp"
    options: dict[str, Any] = field(default_factory=dict)


CODECS = ("tiny", "mimi")


@dataclass
class TalkerSection:
    """The speech-out talker (omni/speech/talker.py) and the codec whose frames it speaks
    (docs/speech_out.md). Off unless `enabled` (a speech_out stage turns it on with the model
    override `talker.enabled=true`); its parameters are then `talker.*`."""
    enabled: bool = False
    codec: str = "tiny"                 # "tiny": residual-VQ log-mel fitted on the corpus; "mimi": pretrained
    codec_pretrained: str | None = None  # mimi: an HF name or folder (kyutai/mimi)
    codebooks: int = 4                  # codebooks the talker predicts (mimi: its first N)
    codebook_size: int = 64             # entries per codebook (mimi: must be the checkpoint's, 2048)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 1024           # conditioning + speech steps of one answer
    max_frames: int = 250               # longest answer speech generated, in codec frames

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ConfigError(f"talker.codec: {self.codec!r} is not one of {list(CODECS)}")
        if self.codec == "mimi" and not self.codec_pretrained:
            raise ConfigError("talker.codec_pretrained: codec mimi loads a pretrained Mimi; name one (kyutai/mimi)")
        if min(self.codebooks, self.codebook_size, self.max_frames) < 1:
            raise ConfigError("talker.codebooks, talker.codebook_size and talker.max_frames must be >= 1")


@dataclass
class ModelConfig:
    name: str
    llm: LLMConfig
    image: ImageTowerConfig
    audio: AudioTowerConfig
    video: VideoSamplingConfig
    projectors: dict[str, ProjectorConfig]  # one per modality in MODALITIES
    # "synth-wordlevel" (offline tiny), an HF name/dir, or null: the LLM's own (llm.pretrained's), so
    # a preset names its tokenizer with its LLM and changing llm.pretrained changes both
    tokenizer: str | None = None
    anyres: AnyResConfig = field(default_factory=AnyResConfig)  # image tiling; max_tiles 0: one tile
    talker: TalkerSection = field(default_factory=TalkerSection)  # speech out; off unless talker.enabled

    def __post_init__(self):
        missing = [m for m in MODALITIES if m not in self.projectors]
        if missing:
            raise ConfigError(f"projectors: missing entries for {missing}")
        if self.tokenizer is None:
            if self.llm.pretrained is None:
                raise ConfigError("tokenizer: a random-init LLM (llm.pretrained: null) has no tokenizer of its own; "
                                  "name one (an HF name or folder)")
            self.tokenizer = self.llm.pretrained


_SIZES: dict[str, dict[str, Any]] = {
    "7b": dict(
        llm=dict(pretrained="Qwen/Qwen2-7B"),  # its config.json is the architecture, its tokenizer the tokenizer
        image=dict(open_clip_model="ViT-SO400M-14-SigLIP-384", pretrained="webli"),
        audio=dict(n_mels=128, n_ctx=1500, n_state=1280, n_head=20, n_layer=32, checkpoint="large-v3",
                   max_windows=8),  # 4 min = 3,000 audio tokens of the 32k context
        video=dict(fps=1.0, max_frames=48),
        anyres=dict(max_tiles=9, thumbnail=True),  # LLaVA-OneVision style: up to 3x3 tiles + thumbnail
        conv_stride=4,
        tokenizer=None,
        # Mimi's first 8 of 32 codebooks at 12.5 frames/s (Moshi's semantic + 7 acoustic levels)
        talker=dict(codec="mimi", codec_pretrained="kyutai/mimi", codebooks=8, codebook_size=2048,
                    hidden_size=1024, layers=12, heads=16, kv_heads=4, intermediate_size=4096,
                    max_positions=4096, max_frames=1500),
    ),
    "small": dict(
        llm=dict(hf_config=dict(
            model_type="qwen2", vocab_size=16384, hidden_size=896, intermediate_size=4736,
            num_hidden_layers=4, num_attention_heads=7, num_key_value_heads=1,
            max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )),
        image=dict(vision_cfg=dict(image_size=224, patch_size=14, width=384, layers=6, head_width=64)),
        audio=dict(n_mels=80, n_ctx=1500, n_state=384, n_head=6, n_layer=4, max_windows=4),
        video=dict(fps=1.0, max_frames=8),
        anyres=dict(max_tiles=0),
        conv_stride=4,
        tokenizer=TINY_TOKENIZER,  # offline; the LLM's vocabulary is larger, so its head is real-sized
        talker=dict(codec="tiny", codebooks=4, codebook_size=256, hidden_size=512, layers=4, heads=8, kv_heads=2,
                    intermediate_size=2048, max_positions=2048, max_frames=1000),
    ),
    "tiny": dict(
        llm=dict(hf_config=dict(
            model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )),
        image=dict(vision_cfg=dict(image_size=32, patch_size=4, width=128, layers=2, head_width=32)),
        audio=dict(n_mels=80, n_ctx=50, n_state=128, n_head=4, n_layer=2, max_windows=4),
        video=dict(fps=1.0, max_frames=4),
        anyres=dict(max_tiles=0),  # one 32-px tile; `anyres.max_tiles=4` turns tiling on
        conv_stride=4,
        tokenizer=TINY_TOKENIZER,
        talker=dict(codec="tiny", codebooks=4, codebook_size=64, hidden_size=128, layers=2, heads=4, kv_heads=2,
                    intermediate_size=256, max_positions=1024, max_frames=250),
    ),
}

PRESETS = tuple(_SIZES)


def _preset_dict(name: str) -> dict:
    if name not in _SIZES:
        raise ConfigError(f"preset {name!r} is unknown; choose one of {list(_SIZES)}")
    s = copy.deepcopy(_SIZES[name])
    stride = s.pop("conv_stride")
    return dict(
        name=name,
        llm=s["llm"],
        image=s["image"],
        audio=s["audio"],
        video=s["video"],
        projectors={
            "image": {"kind": "mlp", "options": {"pool": True}},
            "video": {"kind": "mlp", "options": {"pool": True}},
            "audio": {"kind": "conv_gmlp", "options": {"stride": stride}},
        },
        tokenizer=s["tokenizer"],
        anyres=s["anyres"],
        talker=s["talker"],
    )


def build_preset(name: str, overrides: list[str] = ()) -> ModelConfig:
    """The named preset with dotted `key=value` overrides (e.g. llm.hf_config.num_hidden_layers=1)."""
    data = apply_overrides(_preset_dict(name), list(overrides), where=f"preset {name} overrides")
    return from_dict(ModelConfig, data, where=f"preset {name}")


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, where="omni_config.json")


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return to_dict(cfg)
