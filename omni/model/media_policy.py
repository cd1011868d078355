"""How much of a long medium the model reads, and which media it refuses: one policy for every
entry point (omni chat, omni eval, the demo, training, an export's processor), applied by
`OmniProcessor.media`; what it did comes back as one-line notes for the user.

- Audio: the whisper encoder reads consecutive windows (30 s at 7B, 1 s tiny). A clip longer than
  `audio.max_windows` windows is cut to its first `max_windows` windows, with a note. A clip with
  no sound (its loudest 20 ms below SILENCE_DBFS: digital silence, or noise too faint to hold
  anything) is refused: `MediaRefused`.
- Video: frames are sampled at `video.fps`; a video longer than `max_frames / fps` seconds gets
  `max_frames` frames spread evenly over it instead, with a note. A list of frames longer than
  `max_frames` is spread the same way.
- The prompt: the media never push it past the model's context; the processor refuses such a
  prompt with `PromptTooLong`, whose one line says how many tokens the media take.
Why cut rather than refuse, and why the same in training: docs/decisions.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from encoders.audio import SAMPLE_RATE, loudest_frame_dbfs
from encoders.video import VideoSamplingConfig, read_video
from omni.errors import SampleError

SILENCE_DBFS = -60.0  # a clip whose loudest 20 ms stays below this has nothing to hear


class MediaRefused(SampleError):
    """A medium the model will not take (e.g. silence); the message is one line for the user."""


class PromptTooLong(SampleError):
    """The prompt with its media's tokens passes the model's context (max_length)."""


@dataclass(frozen=True)
class MediaPolicy:
    window_samples: int           # audio samples per encoder window (16 kHz)
    max_windows: int              # audio: windows read per clip
    video: VideoSamplingConfig    # fps and max_frames

    @property
    def max_audio_samples(self) -> int:
        return self.window_samples * self.max_windows

    def describe(self) -> str:
        """The limits in words (the demo's header, docs)."""
        window_s = self.window_samples / SAMPLE_RATE
        return (f"audio: at most {self.max_windows} window(s) of {window_s:g} s = "
                f"{self.max_audio_samples / SAMPLE_RATE:g} s per clip; video: {self.video.fps:g} fps, "
                f"at most {self.video.max_frames} frames")

    def audio(self, wav, name: str = "audio") -> tuple[np.ndarray, list[str]]:
        """(the waveform the model reads, notes): silence refused, a long clip cut."""
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1 or wav.size == 0:
            raise MediaRefused(f"{name}: expected a non-empty mono 16 kHz waveform, got shape {wav.shape}")
        level = loudest_frame_dbfs(wav, SAMPLE_RATE)
        if not level >= SILENCE_DBFS:
            raise MediaRefused(f"{name} is silent (nothing in it reaches {SILENCE_DBFS:g} dBFS): there is "
                               "nothing to hear; send a recording with sound in it")
        if wav.size <= self.max_audio_samples:
            return wav, []
        note = (f"{name} is {wav.size / SAMPLE_RATE:.1f} s: cut to its first {self.max_audio_samples / SAMPLE_RATE:g} s "
                f"(the model reads at most {self.max_windows} audio window(s) of {self.window_samples / SAMPLE_RATE:g} s)")
        return wav[: self.max_audio_samples], [note]

    def frames(self, video, name: str = "video") -> tuple[list[Image.Image], list[str]]:
        """(the frames the model sees, notes) of a video file (path or bytes) or a list of frames."""
        cap = self.video.max_frames
        if isinstance(video, list):
            if len(video) <= cap:
                return video, []
            keep = [int(i) for i in np.round(np.linspace(0, len(video) - 1, cap))]
            return [video[i] for i in keep], [f"{name} has {len(video)} frames: the model takes at most {cap}, "
                                              "spread evenly over them"]
        try:
            clip = read_video(video, self.video)
        except ValueError as e:
            raise MediaRefused(f"{name}: {e}") from None
        if not clip.spread:
            return clip.frames, []
        return clip.frames, [f"{name} is {clip.seconds:.1f} s: the model takes at most {cap} frames, so "
                             f"{len(clip.frames)} were spread evenly over it instead of {self.video.fps:g} per second"]
