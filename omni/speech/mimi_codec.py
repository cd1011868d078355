"""The pretrained codec route: a transformers MimiModel (kyutai/mimi: 24 kHz, 12.5 frames a second,
up to 32 residual codebooks) behind the `Codec` interface, loaded with `from_pretrained` from the hub
or a local folder."""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig, MimiModel


class MimiCodec:
    def __init__(self, pretrained: str, codebooks: int | None = None):
        config = AutoConfig.from_pretrained(pretrained)
        if config.model_type != "mimi":
            raise ValueError(f"MimiCodec: {pretrained} holds a {config.model_type!r} model, not a Mimi codec "
                             "(model_type 'mimi'); name a Mimi checkpoint such as kyutai/mimi")
        codebooks = codebooks or config.num_quantizers
        if not 0 < codebooks <= config.num_quantizers:
            raise ValueError(f"MimiCodec: codebooks must be in 1..{config.num_quantizers} for {pretrained}, "
                             f"got {codebooks}")
        self.model = MimiModel.from_pretrained(pretrained).eval()
        self.sample_rate = int(config.sampling_rate)
        self.frame_rate = float(config.frame_rate)
        self.codebooks = codebooks
        self.codebook_size = int(config.codebook_size)

    @torch.no_grad()
    def encode(self, wave: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(wave, dtype=torch.float32).reshape(1, 1, -1)
        return self.model.encode(x, num_quantizers=self.codebooks).audio_codes[0].long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        if codes.ndim != 2 or codes.shape[0] != self.codebooks:
            raise ValueError(f"MimiCodec.decode: codes must be [{self.codebooks}, frames], got {list(codes.shape)}")
        return self.model.decode(codes[None].long()).audio_values[0, 0].float().numpy()
