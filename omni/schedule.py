"""Run a schedule: stages in order, each starting from the previous stage's `final/` model, and the
checks between them (`speech_eval` steps, omni/speech_guard.py)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omni.config import ConfigError
from omni.data.manifest import load_manifest
from omni.distributed import World
from omni.files import atomic_dir
from omni.speech_guard import ScoredStage, check_speech, record_scores
from omni.train.config import SpeechEvalStep, StageConfig, load_schedule, load_stage
from omni.train.trainer import FINAL, train_stage

log = logging.getLogger(__name__)


def _scored_stages(path: Path, entries: list, stages: list[StageConfig], out_dir: Path) -> dict[int, tuple]:
    """For each speech_eval step (by its index in `entries`): the stage it scores and the last speech_out
    stage up to it (None if there is none), refused at load when a bound cannot be checked."""
    out, before, last_speech = {}, None, None
    stage_iter = iter(stages)
    for i, entry in enumerate(entries):
        if not isinstance(entry, SpeechEvalStep):
            before = next(stage_iter)
            last_speech = before if before.method == "speech_out" else last_speech
            continue
        where = f"{path}: stages[{i}] (speech_eval)"
        if entry.max_drop is not None and last_speech is None:
            raise ConfigError(f"{where}: max_drop compares with the score after a speech_out stage, and none "
                              "comes before it; put it after one, or give min_spoken only")
        manifest = (last_speech or before).data.manifest  # the corpus that has the spoken answers
        if manifest is None:
            raise ConfigError(f"{where}: stage {(last_speech or before).name} reads no manifest (data.manifest) "
                              "to take held-out spoken answers from")
        load_manifest(manifest).select("val", entry.datasets)  # names checked before any stage trains
        out[i] = tuple(None if s is None else ScoredStage(s.name, out_dir / s.name, manifest)
                       for s in (before, last_speech))
    return out


def run_schedule(path: str | Path, out_dir: str | Path, overrides: list[str] = (),
                 progress: bool = True, resume_with_changes: bool = False) -> Path:
    """Train every stage of the schedule under `out_dir/<stage name>/`, run its checks where they stand;
    copy the last model to `out_dir/final/`. Stages whose `final/` exists are skipped, so a killed
    schedule resumes; a speech_eval step that fails stops it (SpeechRegression).

    Under torchrun the process group is joined once for the whole schedule (a group torn down and
    joined again would meet the first one's stale addresses), every rank trains every stage, and
    only rank 0 writes the shared `final/` and scores speech while the others wait at a barrier."""
    sched, files = load_schedule(path)
    out_dir = Path(out_dir)
    stages = [load_stage(f, overrides) for f in files]  # validate every stage before training any
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    for i, cfg in enumerate(stages):
        if cfg.init_from == "previous" and i == 0:
            raise ConfigError(f"{files[i]}: init_from: previous, but it is the first stage")
    scored = _scored_stages(Path(path), sched.stages, stages, out_dir)
    world = World.from_env(need_group=any(cfg.engine != "ddp" for cfg in stages))
    try:
        previous: Path | None = None
        pending = enumerate(stages, 1)
        for i, entry in enumerate(sched.stages):
            if isinstance(entry, SpeechEvalStep):
                stage, baseline = scored[i]
                for scored_stage in ([baseline] if entry.max_drop is not None else []) + [stage]:
                    if world.main:  # the baseline is scored here only if no step recorded it yet
                        record_scores(scored_stage, entry, progress=progress)
                    world.barrier()
                scores = check_speech(entry, stage, baseline)  # every rank stops alike
                log.info("speech_eval after %s: spoken accuracy %s", stage.name,
                         ", ".join(f"{d} {v:.3f}" for d, v in scores.items()))
                continue
            n, cfg = next(pending)
            if cfg.init_from == "previous":
                cfg.init_from = str(previous)
            stage_out = out_dir / cfg.name
            if (stage_out / FINAL).is_dir():
                log.info("stage %d/%d %s already done, skipping", n, len(stages), cfg.name)
            else:
                log.info("stage %d/%d %s", n, len(stages), cfg.name)
                train_stage(cfg, stage_out, progress=progress, resume_with_changes=resume_with_changes)
            previous = stage_out / FINAL
        if world.main:
            with atomic_dir(out_dir / FINAL) as tmp:
                shutil.copytree(previous, tmp, dirs_exist_ok=True)
        world.barrier()
    finally:
        world.close()
    return out_dir / FINAL
