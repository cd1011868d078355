"""The omni computation, shared by the training model and the exported Hugging Face model.

`OmniComposition` is a mixin for a torch module that holds `llm` (a transformers causal LM fed
`inputs_embeds`), `encoders.{image,audio}`, `projectors.{image,video,audio}` and the placeholder
`token_ids`. `omni.model.omni_model.OmniModel` (training) and `OmniForCausalLM` (the export's
remote code) both build themselves with `compose` and run `embed` / `add_max_z_loss`, so the
two cannot drift apart. The attributes live on the module itself (not a submodule) because
checkpoints, exports and golden losses name parameters `llm.*`, `encoders.*`, `projectors.*`.

Torch-only (encoders, projectors, omni.model.{baichuan2,batch,fusion}): `omni export` ships this
file as remote code.
"""
from __future__ import annotations

import torch
from torch import nn

from encoders.audio import AudioEncoder, AudioTowerConfig
from encoders.image import ImageEncoder, ImageTowerConfig
from omni.modalities import MODALITIES
from omni.model.baichuan2 import max_z_loss, use_norm_head
from omni.model.batch import MediaBatch
from omni.model.fusion import scatter_features
from projectors import build_projector


class OmniComposition:
    """encoders -> projectors -> placeholder positions of the LLM's input embeddings."""

    llm: nn.Module
    encoders: nn.ModuleDict
    projectors: nn.ModuleDict
    token_ids: dict[str, int]

    def compose(self, llm: nn.Module, image: ImageTowerConfig, audio: AudioTowerConfig,
                projectors: dict[str, dict], token_ids: dict[str, int], norm_head: bool) -> None:
        """Attach the LLM and build towers then projectors, in the order random init depends on.
        `projectors`: {modality: {"kind", "options"}} (projectors.build_projector)."""
        self.llm = llm
        if norm_head:
            use_norm_head(llm)
        self.token_ids = {m: int(token_ids[m]) for m in MODALITIES}
        self.encoders = nn.ModuleDict({"image": ImageEncoder(image), "audio": AudioEncoder(audio)})
        image_dim = self.encoders["image"].out_dim
        in_dims = {"image": image_dim, "video": image_dim, "audio": self.encoders["audio"].out_dim}
        hidden = llm.config.hidden_size
        self.projectors = nn.ModuleDict({
            m: build_projector(projectors[m]["kind"], in_dim=in_dims[m], out_dim=hidden,
                               **projectors[m].get("options", {}))
            for m in MODALITIES
        })

    def encode(self, modality: str, media: MediaBatch) -> torch.Tensor:
        """Projected tokens of every medium of `modality` in the batch, flattened to [n, D]."""
        if modality in ("image", "video"):
            feats = self.projectors[modality](self.encoders["image"](getattr(media, modality)))
            return feats.reshape(-1, feats.shape[-1])
        if modality == "audio":
            encoder = self.encoders["audio"]  # log-mels arrive in float32; the tower may be bf16
            feats = self.projectors["audio"](encoder(media.audio.to(encoder.encoder.conv1.weight.dtype)))
            if len(media.audio_valid) != feats.shape[0]:
                raise ValueError(f"audio: {feats.shape[0]} log-mel windows but {len(media.audio_valid)} "
                                 "audio_valid entries")
            projector = self.projectors["audio"]
            return torch.cat([feats[w, : projector.num_tokens(int(v))] for w, v in enumerate(media.audio_valid)])
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
            if getattr(media, modality) is None:
                features = embeds.new_zeros(0, embeds.shape[-1])
                if modality in blank:
                    embeds = embeds + 0.0 * self.encode(modality, self.blank_media(modality, input_ids.device)).sum()
            else:
                features = self.encode(modality, media)
            embeds = scatter_features(embeds, input_ids, self.token_ids[modality], features, modality)
        return embeds

    @staticmethod
    def add_max_z_loss(out, labels: torch.Tensor | None, coef: float, num_items: float | None = None):
        """Baichuan 2's max-z loss added to `out.loss` (normalised like the LM's cross-entropy)."""
        if labels is not None and coef > 0:
            out.loss = out.loss + max_z_loss(out.logits, labels, coef, num_items)
        return out
