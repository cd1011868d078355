"""Run a schedule: stages in order, each starting from the previous stage's `final/` model."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omni.config import ConfigError
from omni.distributed import World
from omni.files import atomic_dir
from omni.train.config import load_schedule, load_stage
from omni.train.trainer import FINAL, train_stage

log = logging.getLogger(__name__)


def run_schedule(path: str | Path, out_dir: str | Path, overrides: list[str] = (),
                 progress: bool = True, resume_with_changes: bool = False) -> Path:
    """Train every stage of the schedule under `out_dir/<stage name>/`; copy the last model to
    `out_dir/final/`. Stages whose `final/` exists are skipped, so a killed schedule resumes.

    Under torchrun the process group is joined once for the whole schedule (a group torn down and
    joined again would meet the first one's stale addresses), every rank trains every stage, and
    only rank 0 writes the shared `final/` while the others wait at a barrier."""
    sched, files = load_schedule(path)
    out_dir = Path(out_dir)
    stages = [load_stage(f, overrides) for f in files]  # validate every stage before training any
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    for i, cfg in enumerate(stages):
        if cfg.init_from == "previous" and i == 0:
            raise ConfigError(f"{files[i]}: init_from: previous, but it is the first stage")
    world = World.from_env(need_group=any(cfg.engine != "ddp" for cfg in stages))
    try:
        previous: Path | None = None
        for i, cfg in enumerate(stages):
            if cfg.init_from == "previous":
                cfg.init_from = str(previous)
            stage_out = out_dir / cfg.name
            if (stage_out / FINAL).is_dir():
                log.info("stage %d/%d %s already done, skipping", i + 1, len(stages), cfg.name)
            else:
                log.info("stage %d/%d %s", i + 1, len(stages), cfg.name)
                train_stage(cfg, stage_out, progress=progress, resume_with_changes=resume_with_changes)
            previous = stage_out / FINAL
        if world.main:
            with atomic_dir(out_dir / FINAL) as tmp:
                shutil.copytree(previous, tmp, dirs_exist_ok=True)
        world.barrier()
    finally:
        world.close()
    return out_dir / FINAL
