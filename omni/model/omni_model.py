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
  (omni/model/fusion.py); counts must match exactly.
Labels at media and prompt positions are -100 (set by the processor).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from omni.config import ConfigError
from omni.files import file_sha256
from omni.modalities import MODALITIES
from omni.model.architecture import llm_config, with_architecture
from omni.model.batch import MediaBatch
from omni.model.composition import OmniComposition
from omni.model.integrity import CHECKSUMS, check_recorded
from omni.model.lm_loss import CHUNKED_ABOVE_LOGITS, chunked_lm_loss
from omni.model.speech import build_talker, speech_loss
from omni.model.varlen_attention import NAME as SDPA_VARLEN
from omni.presets import ModelConfig, model_config_to_dict
from omni.tokenizer import load_tokenizer, placeholder_ids

WEIGHTS = "model.safetensors"
CONFIG = "omni_config.json"
TOKENIZER_DIR = "tokenizer"


ATTENTION_BACKENDS = ("auto", SDPA_VARLEN, "sdpa", "eager", "flash_attention_2")
HALF = (torch.float16, torch.bfloat16)
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}  # a stage's `precision` -> its forward dtype


def attention_backend(requested: str, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> str:
    """The LLM's attention backend for forwards that run in `dtype` (the autocast dtype, or the
    weights' own without autocast) on `device`. "auto": FlashAttention-2 for fp16/bf16 forwards on
    a GPU where flash-attn is installed, else PyTorch SDPA per packed sample ("sdpa_varlen",
    omni/model/varlen_attention.py; "sdpa" is transformers' SDPA over the whole packed row with a
    block-diagonal mask, the same numbers at (sum of lengths)^2 cost). FlashAttention-2 computes in fp16/bf16
    only, so asking for it where it cannot run is a ConfigError saying what to change, not a crash
    inside the kernel. `dtype`/`device` None: not known yet (a model being built, in fp32 on the CPU
    or meta device): a backend that runs anywhere; `OmniModel.use_attention` switches it once known."""
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(f"llm.attn_implementation: {requested!r} is not one of {list(ATTENTION_BACKENDS)}")
    if requested in (SDPA_VARLEN, "sdpa", "eager"):
        return requested
    if dtype is None or device is None:
        return SDPA_VARLEN
    on_gpu = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_gpu and dtype in HALF and flash_attn_installed() else SDPA_VARLEN
    if dtype not in HALF:
        raise ConfigError(f"llm.attn_implementation: flash_attention_2 computes in fp16/bf16, but this forward runs in "
                          f"{dtype}; run it in bf16 (a stage's precision: bf16), or set llm.attn_implementation: auto "
                          "(SDPA per sample for fp32 forwards)")
    if not on_gpu:
        raise ConfigError(f"llm.attn_implementation: flash_attention_2 needs a CUDA GPU, not {device}; "
                          "set llm.attn_implementation: auto")
    if not flash_attn_installed():
        raise ConfigError("llm.attn_implementation: flash_attention_2 needs the flash-attn package; install it "
                          "(pip install flash-attn) or set llm.attn_implementation: auto")
    return "flash_attention_2"


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def build_llm(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    """The causal LM, in fp32 on every path: `llm.pretrained`'s weights, or random init; either way
    on the architecture omni/model/architecture.py derives, so rank 0 (weights), the other ranks'
    meta-device skeletons and `omni plan` build the same model."""
    config = llm_config(cfg)
    attn = attention_backend(cfg.llm.attn_implementation)
    if pretrained and cfg.llm.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.llm.pretrained, config=config, attn_implementation=attn,
                                                    dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


class OmniModel(OmniComposition, nn.Module):
    """The training model: the shared composition (omni/model/composition.py) plus persistence,
    the token arithmetic and a training forward."""

    chunked_loss_above = CHUNKED_ABOVE_LOGITS  # logits elements above which `forward` chunks the loss

    def __init__(self, cfg: ModelConfig, llm: nn.Module, token_ids: dict[str, int], pretrained: bool = False):
        super().__init__()
        self.config = with_architecture(cfg, llm.config)
        image_cfg, audio_cfg = cfg.image, cfg.audio
        if not pretrained:  # towers stay random-init unless the preset's weights are wanted
            image_cfg = dataclasses.replace(image_cfg, pretrained=None)
            audio_cfg = dataclasses.replace(audio_cfg, checkpoint=None)
        self.compose(llm, image_cfg, audio_cfg, projector_specs(cfg), token_ids, cfg.llm.norm_head)
        # speech out (omni/model/speech.py), built last so the other parts' random init is the same with or without it
        self.talker = build_talker(cfg.talker, llm.config.hidden_size) if cfg.talker.enabled else None
        self.codec = None  # the talker's codec: load_model / a speech_out stage sets it; saved with the model

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
        """Write weights (safetensors), config and tokenizer into `out_dir` (callers make it atomic;
        omni.model.load.load_model reads it back). `state_dict`: the full weights, when this module
        only holds a shard of them (FSDP2, ZeRO-3 gather them first); written exactly as this
        module's own would be (tied weights once)."""
        from safetensors.torch import save_model

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self if state_dict is None else _Weights(state_dict), str(out_dir / WEIGHTS))
        meta = {"model": model_config_to_dict(self.config), "token_ids": self.token_ids,
                "llm_config": self.llm.config.to_dict(), CHECKSUMS: {WEIGHTS: file_sha256(out_dir / WEIGHTS)}}
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
        tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
        if self.codec is not None and hasattr(self.codec, "save"):  # a fitted codec; a pretrained one is named
            self.codec.save(out_dir)

    def load_weights(self, model_dir: str | Path, absent: set[str] = frozenset()) -> None:
        """Weights of a `save_pretrained` folder into this model, in place (what a resume reads),
        once they match the sha256 its config recorded. `absent`: names the folder does not hold
        (a QLoRA checkpoint's 4-bit base, omni/train/qlora.py); every other one must be there."""
        from safetensors.torch import load_model

        path = Path(model_dir) / WEIGHTS
        config = Path(model_dir) / CONFIG
        try:
            recorded = json.loads(config.read_text()).get(CHECKSUMS) if config.is_file() else None
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{config}: not readable JSON ({e}); the folder is damaged") from None
        check_recorded(path, recorded)
        try:
            missing, unexpected = load_model(self, str(path), strict=not absent)
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a torn file or other keys
            raise ConfigError(f"{path}: cannot be read into the model ({type(e).__name__}: {e})") from None
        missing = [k for k in missing if k not in absent]
        if missing or unexpected:
            raise ConfigError(f"{path}: cannot be read into the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")

    def enable_activation_checkpointing(self) -> None:
        """Recompute activations in backward: the LLM via transformers, the vision tower via
        open_clip, the whisper tower block by block (encoders/audio.py)."""
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        self.encoders["image"].visual.set_grad_checkpointing(True)
        self.encoders["audio"].set_grad_checkpointing(True)

    def compile_blocks(self) -> None:
        """torch.compile each LLM decoder layer and each tower block, in place (`nn.Module.compile`):
        the repeated blocks are where the time goes, one compiled graph serves every layer of a
        stack, and the parameter names (checkpoints, export) stay those of the uncompiled model.
        Embeddings, fusion, the loss and the projectors stay eager."""
        image = self.encoders["image"].visual
        blocks = [*self.llm.get_decoder().layers, *self.encoders["audio"].encoder.blocks,
                  *(image.trunk.blocks if hasattr(image, "trunk") else image.transformer.resblocks)]
        for block in blocks:
            block.compile()

    def use_attention(self, dtype: torch.dtype, device: torch.device | str) -> str:
        """Switch the LLM to the attention backend for forwards in `dtype` on `device`
        (`attention_backend` of the config's `llm.attn_implementation`); returns its name."""
        name = attention_backend(self.config.llm.attn_implementation, dtype, device)
        self.llm.set_attn_implementation(name)
        return name

    # ---- token counts of the built modules (FLOPs, tables) ----------------------------------
    def image_tokens(self) -> int:
        return self.projectors["image"].num_tokens(self.encoders["image"].num_patches)

    def video_tokens(self, frames: int) -> int:
        return frames * self.projectors["video"].num_tokens(self.encoders["image"].num_patches)

    def audio_window_tokens(self, valid_frames: int) -> int:
        return self.projectors["audio"].num_tokens(valid_frames)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, media: MediaBatch | None = None,
                position_ids=None, num_items_in_batch: float | None = None, blank: tuple[str, ...] = (),
                speech: list[torch.Tensor] | None = None):
        """`num_items_in_batch`: divide the summed token losses by this instead of taking the mean
        (the trainer passes the label tokens of the whole step, so accumulation and data
        parallelism weigh every token equally). `blank`: see `embed`. `speech`: codec codes
        [codebooks, frames] of each row's spoken answer (the tokens `labels` marks): the loss is then
        the talker's over those codes, the thinker run teacher-forced (omni/model/speech.py)."""
        if speech is not None:
            if self.talker is None:
                raise ConfigError("this model has no talker: set the model override talker.enabled=true")
            loss = speech_loss(self, input_ids, attention_mask, labels, media, speech, position_ids,
                               num_items_in_batch, blank)
            return CausalLMOutputWithPast(loss=loss)
        embeds = self.embed(input_ids, media, blank)
        if labels is not None and labels.numel() * self.llm.config.vocab_size > self.chunked_loss_above:
            return self.chunked_forward(embeds, attention_mask, labels, position_ids, num_items_in_batch)
        # no KV cache in a training/scoring forward: with one, transformers would not turn packed
        # position ids into a per-sample mask
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                       position_ids=position_ids, use_cache=False, **kwargs)
        return self.add_max_z_loss(out, labels, self.config.llm.max_z_loss, num_items_in_batch)

    def chunked_forward(self, embeds, attention_mask, labels, position_ids, num_items_in_batch):
        """The training forward of a long micro-batch: the decoder's hidden states, then the head
        and loss chunk by chunk (omni/model/lm_loss.py); no logits are returned."""
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
        loss = chunked_lm_loss(hidden, self.llm.get_output_embeddings(), labels, num_items_in_batch,
                               self.config.llm.max_z_loss)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media: MediaBatch | None = None, prompt_cache=None, **kwargs):
        """Greedy/sampled continuation; returns only the new token ids (left-padded prompts).
        `prompt_cache` (omni.model.prompt_cache.PromptCache, one prompt): the LLM runs only the
        positions it does not hold, and it keeps this prompt's for the next call."""
        embeds = self.embed(input_ids, media)
        if prompt_cache is None:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        completed = False
        try:
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                    cache=prompt_cache.for_generation(self.llm, input_ids, embeds), **kwargs)
            completed = True
            return out
        finally:
            prompt_cache.generated(input_ids, embeds, completed)


def projector_specs(cfg: ModelConfig) -> dict[str, dict]:
    """{modality: {"kind", "options"}} of a model config, the form the composition builds from."""
    return {m: {"kind": cfg.projectors[m].kind, "options": dict(cfg.projectors[m].options)} for m in MODALITIES}


class _Weights(nn.Module):
    """A state dict posing as a module, for safetensors' `save_model` (which drops tied duplicates)."""

    def __init__(self, state_dict: dict):
        super().__init__()
        self._weights = state_dict

    def state_dict(self, *args, **kwargs):
        return dict(self._weights)
