"""Model FLOPs of a training micro-batch, and the peak FLOP/s that MFU divides by (`log.profile`).

Model FLOPs follow PaLM's appendix B (Chowdhery et al. 2022): recomputation (activation
checkpointing) is not counted, attention is counted over the full s x s score matrix. For each
transformer (the LLM, the vision tower over every image tile and video frame, the audio tower
over every window) and each projector, with N its matmul parameters (input embedding tables
excluded, the LM head included), N_t the trainable ones among them, t its tokens, L its layers,
d its width and s_i each sequence's length:
    forward           2 * N * t                + 4 * L * d * sum(s_i^2)
    backward, inputs  2 * N * t                + 8 * L * d * sum(s_i^2)   if a gradient flows through it
    backward, weights 2 * N_t * t
With everything trainable this is PaLM's 6 * N * t + 12 * L * d * sum(s_i^2); a frozen tower costs
only its forward, a frozen LLM in front of a trainable projector costs 4 * N * t (the gradient must
still flow through it). LLM sequences are the samples (each packed sample on its own, padding not
counted); a tower's sequences are its tiles, frames and windows; projectors are charged per
output token, without attention.

MFU = model FLOPs per second per device / the device's peak: dense bf16 tensor-core peak from
`PEAK_BF16_TFLOPS` by `torch.cuda.get_device_name()`, or `log.peak_tflops`. No peak (CPU, an
unknown GPU, fp32 training without `log.peak_tflops`): tokens/s and TFLOP/s only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# dense (no sparsity) bf16 peak TFLOP/s per device, from the vendors' datasheets; first substring match wins
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)
TOWER_BLOCKS = ("ResidualAttentionBlock", "Block")  # open_clip / whisper, timm


def peak_for_gpu(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU by its `torch.cuda.get_device_name()`; None if unknown."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> float | None:
    """Per-device peak for MFU: the configured value, else the bf16 table for a known GPU."""
    if configured > 0:
        return configured
    if device.type != "cuda" or precision != "bf16":
        return None
    return peak_for_gpu(torch.cuda.get_device_name(device))


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@dataclass
class Part:
    params: int          # matmul parameters
    trainable: int
    backward: bool       # a gradient flows through its inputs' side (so input gradients are computed)
    layers: int = 0
    width: int = 0

    def flops(self, tokens: float, sum_sq: float = 0.0) -> float:
        matmul = 2 * self.params * tokens * (2 if self.backward else 1) + 2 * self.trainable * tokens
        attention = 4 * self.layers * self.width * sum_sq * (3 if self.backward else 1)
        return matmul + attention


class FlopCounter:
    """Model FLOPs of one micro-batch's forward and backward; build it before the engine shards
    the model (parameter counts and `requires_grad` are read once)."""

    def __init__(self, model: nn.Module):
        self.model = model
        llm = model.llm
        embed = llm.get_input_embeddings().weight
        tied = any(p is embed for p in llm.get_output_embeddings().parameters())
        n, n_t = _count(llm.parameters())
        if not tied:
            n, n_t = n - embed.numel(), n_t - (embed.numel() if embed.requires_grad else 0)
        towers = {m: _count(enc.parameters()) for m, enc in model.encoders.items()}
        projectors = {m: _count(p.parameters()) for m, p in model.projectors.items()}
        anything_trains = any(p.requires_grad for p in model.parameters())
        self.llm = Part(n, n_t, anything_trains, llm.config.num_hidden_layers, llm.config.hidden_size)
        self.towers = {}
        for m, enc in model.encoders.items():
            # by class or base class: activation checkpointing swaps whisper's blocks for a subclass
            blocks = [b for b in enc.modules() if any(c.__name__ in TOWER_BLOCKS for c in type(b).__mro__)]
            self.towers[m] = Part(*towers[m], towers[m][1] > 0, len(blocks), enc.out_dim)
        tower_of = {"image": "image", "video": "image", "audio": "audio"}
        self.projectors = {m: Part(*projectors[m], towers[tower_of[m]][1] > 0) for m in projectors}
        self.tower_of = tower_of

    def __call__(self, lengths: list[int], media) -> float:
        """FLOPs of one micro-batch: its samples' token counts (padding and packing excluded) and
        its MediaBatch."""
        total = self.llm.flops(sum(lengths), sum(s * s for s in lengths))
        if media is None:
            return total
        image = self.model.encoders["image"]
        audio = self.model.encoders["audio"]
        for m in ("image", "video", "audio"):
            x = getattr(media, m)
            if x is None:
                continue
            n = x.shape[0]  # tiles, frames or windows
            seq = image.num_patches if m != "audio" else audio.cfg.n_ctx
            total += self.towers[self.tower_of[m]].flops(n * seq, n * seq * seq)
            if m == "image":
                out = n * self.model.image_tokens()
            elif m == "video":
                out = self.model.video_tokens(n)
            else:
                out = sum(self.model.audio_window_tokens(v) for v in media.audio_valid)
            total += self.projectors[m].flops(out)
        return total
