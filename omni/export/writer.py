"""`omni export`: a trained omni model -> a Hub-ready transformers folder (remote code).

    omni export --ckpt runs/quickstart --out exports/omni-tiny [--force] [--eval runs/quickstart/eval.json]
    omni export --ckpt runs/quickstart --out exports/omni-tiny --push-to-hub me/omni-tiny [--private]
    omni export --ckpt runs/lora-stage --out exports/omni-lora --adapter-only    # a LoRA stage's peft adapter

`--ckpt` is any of: a schedule run folder (its `final/`), a stage output folder (`final/`, or
the newest `checkpoints/step-*` of an unfinished stage), a model folder itself (`final/`,
`checkpoints/step-*`), or an earlier export. The folder written (see docs/export.md):

    config.json                    OmniConfig: vision/audio/text sub-configs, projectors, token ids, auto_map
    generation_config.json         eos = <|im_end|>, pad, greedy
    model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja    tokenizer with modality tokens + ChatML
    processor_config.json          image (open_clip preprocess, AnyRes), video (fps, cap), audio (whisper dims)
    tiny_codec.json, tiny_codec.safetensors    a model that speaks with the tiny codec: its fitted codebooks
    configuration_omni.py, modeling_omni.py, processing_omni.py, omni_*.py    remote code (remote_code.py)
    README.md                      model card (card.py)

Safety: the folder is written to a temp dir beside `--out` and renamed into place (atomic_dir,
which also removes what a killed export left there); a non-empty `--out` is refused without
`--force`, and `--out` may never contain the source, lie inside it or hold training outputs
(stage.json, final/, checkpoints/, ...), not even with `--force`.
Weights are read and written with safetensors only; no pickle is ever written (checked before
the rename) and none is read (a checkpoint's trainer_state.pt is not opened). config.json records
the sha256 of every weights file (`weights_sha256`), which omni's loader checks.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from omni.config import ConfigError
from omni.export.card import Provenance, StageRecord, model_card, read_eval

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names (`--dtype`); torch loads lazily
OMNI_CONFIG, WEIGHTS, FINAL, STAGE, METRICS, EVAL = ("omni_config.json", "model.safetensors", "final",
                                                     "stage.json", "metrics.jsonl", "eval.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ExportError(ConfigError):
    """The export cannot proceed; the message names the path or option and what to do."""


# ---- what --ckpt points at ----------------------------------------------------------------
def _is_model_dir(p: Path) -> bool:
    return (p / OMNI_CONFIG).is_file() and (p / WEIGHTS).is_file()


def _stage_record(stage_dir: Path, checkpoint: str | None = None) -> StageRecord:
    config = json.loads((stage_dir / STAGE).read_text())
    last = None
    if (stage_dir / METRICS).is_file():
        rows = [line for line in (stage_dir / METRICS).read_text().splitlines() if line.strip()]
        last = json.loads(rows[-1]) if rows else None
    return StageRecord(name=config.get("name", stage_dir.name), path=str(stage_dir), config=config,
                       last_metrics=last, checkpoint=checkpoint)


def _previous_stage(stage_dir: Path, init_from: str | None) -> Path | None:
    """The stage folder whose final/ this stage started from (as recorded, or its sibling by name)."""
    if not init_from:
        return None
    p = Path(init_from)
    for cand in (p.parent, stage_dir.parent / p.parent.name):
        if p.name == FINAL and (cand / STAGE).is_file() and cand.resolve() != stage_dir.resolve():
            return cand
    return None


def _stage_chain(last: Path, checkpoint: str | None = None) -> list[StageRecord]:
    chain, seen, stage, ckpt = [], set(), last, checkpoint
    while stage is not None and stage.resolve() not in seen:
        seen.add(stage.resolve())
        record = _stage_record(stage, ckpt)
        chain.append(record)
        stage, ckpt = _previous_stage(stage, record.config.get("init_from")), None
    return chain[::-1]


def _manifests(stages: list[StageRecord]) -> dict[str, dict]:
    from omni.data.manifest import load_manifest

    out: dict[str, dict] = {}
    for s in stages:
        path = s.config.get("data", {}).get("manifest")
        if not path or path in out:
            continue
        try:
            m = load_manifest(path)
            out[path] = {"name": m.name, "datasets": [
                {"name": d.name, "split": d.split, "num_samples": d.num_samples, "weight": d.weight,
                 "modalities": list(d.modalities), "task": d.task} for d in m.datasets]}
        except (ConfigError, OSError) as e:
            out[path] = {"error": str(e)}
    return out


def resolve_source(ckpt: str | Path) -> tuple[Path, Provenance]:
    """(model folder to load, provenance for the card) for whatever `--ckpt` names."""
    from omni.model.load import consolidate_first, is_exported_dir

    src = Path(ckpt)
    if not src.is_dir():
        raise ExportError(f"--ckpt {src}: no such folder")
    if not _is_model_dir(src) and consolidate_first(src):
        raise ExportError(f"--ckpt {consolidate_first(src)}")
    prov = Provenance(source=str(src), kind="model folder")
    stage_dir, checkpoint, run_dir = None, None, None
    if is_exported_dir(src):
        prov.kind = "export"
        return src, prov
    if _is_model_dir(src):
        model_dir = src
        if src.name == FINAL and (src.parent / STAGE).is_file():
            prov.kind, stage_dir = "stage output", src.parent
        elif src.parent.name == "checkpoints" and (src.parent.parent / STAGE).is_file():
            prov.kind, stage_dir, checkpoint = "checkpoint", src.parent.parent, src.name
        elif src.name == FINAL:
            run_dir = src.parent
    elif (src / STAGE).is_file():
        stage_dir = src
        if _is_model_dir(src / FINAL):
            prov.kind, model_dir = "stage output", src / FINAL
        else:
            steps = sorted(p for p in (src / "checkpoints").glob("step-*") if _is_model_dir(p))
            if not steps:
                raise ExportError(f"--ckpt {src}: a stage folder without final/ or checkpoints/step-*/ to export")
            prov.kind, model_dir, checkpoint = "checkpoint", steps[-1], steps[-1].name
            log.warning("%s has no final/ yet: exporting its newest checkpoint %s", src, steps[-1])
    elif _is_model_dir(src / FINAL):
        prov.kind, model_dir, run_dir = "schedule run", src / FINAL, src
    else:
        raise ExportError(f"--ckpt {src}: not a model folder ({OMNI_CONFIG} + {WEIGHTS}), a stage output "
                          f"({STAGE} + {FINAL}/), a schedule run ({FINAL}/ + stage folders) or an export")
    if run_dir is not None:
        stages = [p for p in run_dir.iterdir() if (p / STAGE).is_file() and _is_model_dir(p / FINAL)]
        if stages:  # the stage that finished last is the one whose final/ the run copied
            stage_dir = max(stages, key=lambda p: (p / FINAL / WEIGHTS).stat().st_mtime_ns)
            prov.kind = "schedule run"
    if stage_dir is not None:
        prov.stages = _stage_chain(stage_dir, checkpoint)
        prov.manifests = _manifests(prov.stages)
    for cand in [run_dir, stage_dir, model_dir.parent]:
        if cand is not None and (cand / EVAL).is_file():
            prov.eval_path, prov.eval = str(cand / EVAL), read_eval(cand / EVAL)
            break
    return model_dir, prov


# ---- writing ------------------------------------------------------------------------------
def _check_out(out: Path, sources: list[Path], force: bool) -> None:
    """`sources`: the folder --ckpt names and the model folder read from it."""
    o = out.resolve()
    for src in sources:
        s = src.resolve()
        if o == s or o in s.parents:
            raise ExportError(f"--out {out} contains the model being exported ({src}); choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any((out / name).exists() for name in (STAGE, OMNI_CONFIG, FINAL, "checkpoints", METRICS)):
        raise ExportError(f"--out {out} holds training outputs ({STAGE}, {FINAL}/, ...); an export never replaces "
                          "them, even with --force: choose another folder")
    inside = [src for src in sources if src.resolve() in o.parents]
    if inside:
        raise ExportError(f"--out {out} lies inside the folder being exported ({inside[0]}); choose a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; pass --force to replace it")


def _state_dict(model, dtype=None) -> dict:
    state = model.state_dict()
    llm = model.llm
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    if head is not None and head.weight is embed.weight:  # tied: transformers re-ties it on load
        state.pop("llm.lm_head.weight")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def _write_weights(state: dict, out: Path, max_shard_size: str | int) -> dict[str, str]:
    """Write the shards and read every tensor back; returns {file: sha256} for config.json."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors import safe_open

    from omni.model.load import weight_checksums, weight_files

    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    checksums = weight_checksums(out)  # hashed now, while the files are in the page cache
    seen = set()
    for f in weight_files(out):  # read back every tensor before the folder is renamed into place
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                if not torch.equal(sf.get_tensor(k), state[k]):
                    raise ExportError(f"{f.name}: {k} reads back different from what was written")
                seen.add(k)
    if seen != set(state):
        raise ExportError(f"weights written incompletely: missing {sorted(set(state) - seen)[:5]}")
    return checksums


def _record_checksums(out: Path, checksums: dict[str, str]) -> None:
    """`weights_sha256` in config.json: omni's loader checks it; OmniConfig drops it on load, so a
    model re-saved with transformers does not carry the hashes of these files."""
    from omni.model.load import HF_CONFIG
    from omni.model.integrity import CHECKSUMS

    config = json.loads((out / HF_CONFIG).read_text())
    config[CHECKSUMS] = checksums
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _warn_unbundled_open_clip(name: str | None) -> None:
    """The consumer rebuilds the tower by open_clip registry name: fine for open_clip's own configs."""
    if name is None:
        return
    import open_clip

    bundled = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    if name not in bundled:
        log.warning("open_clip model %r is not one of open_clip's bundled configs: whoever loads the export must "
                    "register it (open_clip.add_model_config) before from_pretrained", name)


def _clean_tokenizer_config(path: Path) -> None:
    """Drop load-time flags transformers records when the tokenizer came from a local folder
    (`local_files_only` would follow the export to the Hub)."""
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "_commit_hash"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _check_no_pickles(out: Path) -> None:
    for f in out.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            head = fh.read(9)
        # pickle protocol >= 2 starts with 0x80; torch.save writes a zip archive (PK\x03\x04). A
        # safetensors file starts with its header's length (8 bytes, little-endian: 0x80 when that is
        # 128 mod 256), then the JSON header itself
        pickled = head[8:9] != b"{" if f.suffix == ".safetensors" else head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"
        if f.suffix in PICKLE_SUFFIXES or pickled:
            raise ExportError(f"{f.name}: looks like a pickle / torch.save file; exports never contain one")


def write_export(model, tokenizer, out: Path, prov: Provenance, name: str, license: str = "apache-2.0",
                 max_shard_size: str | int = "5GB", dtype: str | None = None) -> list[str]:
    """Write every export file into the (empty, temporary) folder `out`; returns the file names.
    `name` (Hub repo id or folder name) titles the model card and its usage snippet."""
    import torch
    from transformers import GenerationConfig

    from omni.export.processing_omni import OmniProcessor
    from omni.export.remote_code import write_remote_code
    from omni.hf.mapping import PROCESSOR_AUTO_MAP, hf_config_from_model_config
    from omni.model.processor import OmniProcessor as OmniProcessorCore

    torch_dtype = getattr(torch, dtype) if dtype else None
    _warn_unbundled_open_clip(model.config.image.open_clip_model)
    config = hf_config_from_model_config(model.config, model.llm.config.to_dict(), model.token_ids,
                                         next(model.parameters()).dtype)
    if torch_dtype is not None:
        config.dtype = torch_dtype
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, do_sample=False,
                     max_new_tokens=256).save_pretrained(out)
    _record_checksums(out, _write_weights(_state_dict(model, torch_dtype), out, max_shard_size))
    if model.talker is not None and hasattr(model.codec, "save"):  # a fitted codec; a pretrained one is named
        model.codec.save(out)
    core = OmniProcessorCore.from_config(model.config, tokenizer, model.token_ids,
                                         model.llm.config.max_position_embeddings)
    processor = OmniProcessor(tokenizer, chat_template=tokenizer.chat_template, **core.configs())
    processor.auto_map = dict(PROCESSOR_AUTO_MAP)
    processor.save_pretrained(out)
    _clean_tokenizer_config(out / "tokenizer_config.json")
    write_remote_code(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) + ["README.md"]
    (out / "README.md").write_text(model_card(model, prov, license, name, sorted(files)))
    _check_no_pickles(out)
    return sorted(files)


def export_model(ckpt: str | Path, out: str | Path | None, force: bool = False, push_to_hub: str | None = None,
                 private: bool = False, commit_message: str | None = None, *, license: str = "apache-2.0",
                 eval_path: str | Path | None = None, max_shard_size: str | int = "5GB",
                 dtype: str | None = None, api=None, adapter_only: bool = False) -> Path:
    """Export `ckpt` into `out` (see the module docstring); with `push_to_hub`, upload it too.
    `adapter_only`: a LoRA stage's peft adapter folder instead of the merged model (`write_adapter`).
    `out=None` with `push_to_hub` writes into a temporary folder that is removed after the upload.
    `api`: an `huggingface_hub.HfApi` to upload with (default: one with the usual token lookup)."""
    from omni.files import atomic_dir
    from omni.model.load import load_model

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    if push_to_hub:
        _hub_token(api)  # fail before the (long) export when there is no token
    if out is None:
        if not push_to_hub:
            raise ExportError("--out is required unless --push-to-hub is given")
        with tempfile.TemporaryDirectory(prefix="omni-export-") as tmp:
            target = export_model(ckpt, Path(tmp) / "export", push_to_hub=push_to_hub, private=private,
                                  commit_message=commit_message, license=license, eval_path=eval_path,
                                  max_shard_size=max_shard_size, dtype=dtype, api=api,
                                  adapter_only=adapter_only)
            return target
    out = Path(out)
    model_dir, prov = resolve_source(ckpt)
    _check_out(out, [Path(ckpt), model_dir], force)
    if eval_path is not None:
        try:
            prov.eval_path, prov.eval = str(eval_path), read_eval(Path(eval_path))
        except (OSError, ValueError) as e:
            raise ExportError(f"--eval {eval_path}: not an eval.json written by `omni eval` ({e})") from None
    if adapter_only:
        with atomic_dir(out) as tmp:
            write_adapter(model_dir, tmp)
    else:
        model, tokenizer = load_model(model_dir)
        if model.talker is not None and model.codec is None:
            from omni.speech.tiny_codebook import CONFIG_FILE

            raise ExportError(f"{model_dir} has a talker but no fitted codec ({CONFIG_FILE}) to speak with; "
                              "export the stage's final/ (or `omni consolidate` the checkpoint, which copies it)")
        model.eval()
        with atomic_dir(out) as tmp:
            write_export(model, tokenizer, tmp, prov, name=push_to_hub or out.name, license=license,
                         max_shard_size=max_shard_size, dtype=dtype)
    log.info("exported %s -> %s", model_dir, out)
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, commit_message=commit_message, api=api)
    return out


def write_adapter(model_dir: Path, out: Path) -> None:
    """The peft adapter a LoRA stage saved beside its merged model (`final/adapter/`,
    omni/train/lora.py) into `out`: `peft.PeftModel.from_pretrained(base, out)` loads it on top of
    the stage's starting model (`base_model_name_or_path` in its adapter_config.json, exported)."""
    import shutil

    from omni.train.lora import ADAPTER_DIR

    src = model_dir / ADAPTER_DIR
    files = [src / "adapter_config.json", src / "adapter_model.safetensors"]
    if not all(f.is_file() for f in files):
        raise ExportError(f"--adapter-only: {model_dir} has no LoRA adapter ({ADAPTER_DIR}/adapter_config.json + "
                          "adapter_model.safetensors; a stage with lora.rank > 0 writes one); export the model "
                          "without --adapter-only")
    for f in files:
        shutil.copy2(f, out / f.name)
    _check_no_pickles(out)


# ---- the Hub ------------------------------------------------------------------------------
def _hub_token(api) -> str:
    from huggingface_hub import get_token

    token = (api.token if api is not None else None) or get_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None,
                api=None):
    """create_repo (exist_ok; `private` applies when the repo is created) + upload_folder."""
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi()
    token = _hub_token(api)
    repo = api.create_repo(repo_id, token=token, private=True if private else None, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), token=token, repo_type="model",
                             commit_message=commit_message or f"Upload omni export {Path(folder).name}")
    log.info("uploaded %s to %s (%s)", folder, repo.repo_id, info.commit_url)
    return info


# ---- CLI --------------------------------------------------------------------------------
def shard_size(text: str) -> int:
    """`--max-shard-size`: bytes, or a number with KB/MB/GB/TB (huggingface_hub's own parser)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        value = int(text) if text.strip().isdigit() else parse_size_to_int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give e.g. 5GB, 500MB or a number of bytes") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 bytes")
    return value


def _export_cmd(args) -> None:
    try:
        out = export_model(args.ckpt, args.out, force=args.force, push_to_hub=args.push_to_hub,
                           private=args.private, commit_message=args.commit_message, license=args.license,
                           eval_path=args.eval, max_shard_size=args.max_shard_size, dtype=args.dtype,
                           adapter_only=args.adapter_only)
    except ExportError as e:
        sys.exit(f"export error: {e}")
    if args.out:
        print(f"export: {out}")
    if args.push_to_hub:
        print(f"pushed: {args.push_to_hub}")


def add_export_command(subparsers) -> argparse.ArgumentParser:
    """Register `omni export` on the `omni` CLI's subparsers (omni/cli/main.py's `build_parser`)."""
    p = subparsers.add_parser(
        "export", help="write a Hugging Face folder (transformers, trust_remote_code) from a trained model",
        description="Export a trained omni model as a transformers folder that AutoModelForCausalLM / "
                    "AutoProcessor load with trust_remote_code=True, without omni installed (docs/export.md).")
    p.add_argument("--ckpt", required=True,
                   help="schedule run folder, stage output folder, a final/ or checkpoints/step-N folder, or an export")
    p.add_argument("--out", help="export folder (written to a temp dir, then renamed); optional with --push-to-hub")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload to this Hub repo (token from HF_TOKEN or `hf auth login`; HF_ENDPOINT is honoured)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private (if it does not exist)")
    p.add_argument("--commit-message", help="commit message of the upload")
    p.add_argument("--license", default="apache-2.0", help="license field of the model card (default: apache-2.0)")
    p.add_argument("--eval", help="eval.json (omni eval) for the card; default: one found beside the run")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB", help="safetensors shard size, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating weights (default: as trained)")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA stage's peft adapter folder (PeftModel.from_pretrained on the exported base) "
                        "instead of the merged model")
    p.set_defaults(func=_export_cmd)
    return p
