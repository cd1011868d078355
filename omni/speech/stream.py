"""Speech decoded a chunk of frames at a time, so that audio can play while the talker still speaks
(the demo's streamed answers, docs/demo.md).

A codec decodes a whole code grid (`Codec.decode`); `ChunkDecoder` calls it on each new chunk of
frames together with a few frames before it (`context`: the tiny codec's Griffin-Lim and a neural
codec's convolutions both need neighbours), and holds back the audio of the last `overlap` frames,
which the next chunk's decoding covers again: the two versions are cross-faded, so a chunk boundary
is no click. Frame f of any window starts at sample f * sample_rate / frame_rate of the whole answer
(the tiny codec's centred STFT and Mimi both keep that alignment), so the chunks, concatenated, are
as long as the whole grid decoded at once.

A chunk is a few frames: the tiny codec's mel inversion and Griffin-Lim are then products of small
matrices, which numpy's BLAS threads only slow down (they wait on each other, and on a CPU shared
with other work for their time slices too): a chunk is decoded with one BLAS thread.
"""
from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from omni.speech.codec import Codec

THREADPOOLS = ThreadpoolController()  # numpy's BLAS among them (found once: a fresh look costs about 1 ms)


class ChunkDecoder:
    def __init__(self, codec: Codec, context: int = 8, overlap: int = 3):
        if context < overlap or overlap < 1:
            raise ValueError(f"ChunkDecoder: need context >= overlap >= 1, got context {context}, overlap {overlap}")
        self.codec, self.context, self.overlap = codec, context, overlap
        self.hop = codec.sample_rate / codec.frame_rate  # samples per frame
        self.grid = torch.zeros(codec.codebooks, 0, dtype=torch.long)  # the frames pushed so far
        self.done = 0                        # frames whose audio is emitted (up to their start)
        self.emitted = 0                     # samples emitted
        self.tail = np.zeros(0, np.float32)  # decoded samples from `emitted` on, held back for the cross-fade

    def push(self, codes: torch.Tensor) -> np.ndarray:
        """The audio that is final once these frames [K, n] follow the ones pushed before."""
        if codes.ndim != 2 or codes.shape[0] != self.codec.codebooks:
            raise ValueError(f"ChunkDecoder.push: codes must be [{self.codec.codebooks}, frames], got {list(codes.shape)}")
        self.grid = torch.cat([self.grid, codes.cpu()], dim=1)
        return self._decode(self.grid.shape[1] - self.overlap)

    def flush(self) -> np.ndarray:
        """The rest: the held-back audio of the last frames (call once, after the last push)."""
        out, self.tail = self.tail, np.zeros(0, np.float32)
        self.emitted += out.size
        return out

    def _decode(self, upto: int) -> np.ndarray:
        """Decode from `context` frames before the first frame not yet emitted to the last frame; emit
        the samples before frame `upto`."""
        if upto <= self.done:
            return np.zeros(0, np.float32)
        start = max(0, self.done - self.context)
        with THREADPOOLS.limit(limits=1, user_api="blas"):
            wave = self.codec.decode(self.grid[:, start:])
        new = wave[max(0, self.emitted - round(start * self.hop)):]
        held = min(self.tail.size, new.size)
        if held:  # the previous decoding's last samples fade out while this one's fade in
            ramp = np.linspace(0.0, 1.0, held + 2, dtype=np.float32)[1:-1]
            new = new.copy()
            new[:held] = self.tail[:held] * (1 - ramp) + new[:held] * ramp
        cut = max(0, min(new.size, round(upto * self.hop) - self.emitted))
        out, self.tail = new[:cut], new[cut:]
        self.emitted += cut
        self.done = upto
        return out
