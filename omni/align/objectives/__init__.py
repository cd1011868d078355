"""The objectives a stage trains with, by the name its config's `method:` gives: the one place
these names are defined (omni/train/config.py validates `method:` against it)."""
from __future__ import annotations

from omni.align.objectives.base import Objective
from omni.align.objectives.dpo import DPO
from omni.align.objectives.rm import RM
from omni.align.objectives.sft import SFT
from omni.align.objectives.speech_out import SpeechOut

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (SFT, DPO, RM, SpeechOut)}
