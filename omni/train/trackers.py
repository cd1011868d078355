"""Experiment trackers next to `metrics.jsonl`: `log.trackers: [tensorboard, wandb]`.

Every row the trainer writes to metrics.jsonl (loss, lr, grad norm, fill, skipped samples, with
`log.profile` tokens/s, TFLOP/s and MFU) goes to each tracker as `train/<name>`, and every held-out
result (eval.jsonl) as `eval/<name>`, at the row's step, from rank 0 only; the stage config is the
run's config. The libraries are the field's own, used as they are:
- tensorboard: torch's `SummaryWriter` into `<out>/tensorboard/` (the config as a text summary); a
  resumed run purges the events after its checkpoint's step, as metrics.jsonl drops those rows.
- wandb: a run under `<out>/wandb/`, offline unless the user configures W&B: `WANDB_API_KEY` and
  `WANDB_PROJECT` set (online, into that project), or `WANDB_MODE` set (W&B's own choice). An offline
  run needs no account; `wandb sync <out>/wandb/offline-run-*` uploads it later. A resumed stage is
  a new W&B run that starts at the checkpoint's step.
The packages are optional (`pip install -e .[track]`): asking for one that is not installed is a
ConfigError when the config loads, before any training.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from omni.config import ConfigError

INSTALL = "pip install -e .[track]"


class TensorBoard:
    package = "tensorboard"

    def __init__(self, out_dir: Path, name: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events a killed run wrote after the step it resumes from
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step or None)
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```", global_step=start_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps every row it logged

    def close(self) -> None:
        self.writer.close()


class WandB:
    package = "wandb"

    def __init__(self, out_dir: Path, name: str, config: dict, start_step: int):
        import wandb

        configured = bool(os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_PROJECT"))
        mode = None if os.environ.get("WANDB_MODE") else "online" if configured else "offline"
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "omni"), name=name, config=config,
                                  dir=str(out_dir), mode=mode, settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:  # an online run W&B refuses (no key, no server): say what to change
            raise ConfigError(f"log.trackers: wandb could not start a run ({e}); unset WANDB_MODE and "
                              "WANDB_API_KEY to log offline under the run folder, no account needed") from e

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


def check_trackers(names: list[str], where: str = "log.trackers") -> None:
    """Unknown names and missing packages, each as one line that says what to do."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{where}: {name!r} is not a tracker; choose from {list(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name].package) is None:
            raise ConfigError(f"{where}: {name} needs the {TRACKERS[name].package} package; install the "
                              f"track extra: {INSTALL}")


def scalars(group: str, row: dict) -> dict[str, float]:
    """A metrics or held-out row as tracker scalars `<group>/<key>`: its numbers, nested dicts as
    `<group>/<key>/<sub>`; the step (the x axis), strings and missing values (None) left out."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(scalars(f"{group}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[f"{group}/{key}"] = float(value)
    return out


class Trackers:
    """The stage's open trackers; none on ranks other than 0 (they pass no names)."""

    def __init__(self, names: list[str], out_dir: Path, name: str, config: dict, start_step: int = 0):
        check_trackers(names)
        self.open = [TRACKERS[n](Path(out_dir), name, config, start_step) for n in names]

    def log(self, step: int, group: str, row: dict) -> None:
        values = scalars(group, row)
        for tracker in self.open:
            tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
