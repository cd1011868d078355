"""Model folders: the one loader and the one writer.

`load_model(path, overrides)` returns `(OmniModel, tokenizer)` from every folder omni writes:
- a model folder (`save_model_dir` / `OmniModel.save_pretrained`: omni_config.json +
  model.safetensors + tokenizer/): a stage's `final/`, a resumable checkpoint, an align output;
- an `omni export` folder (config.json of model_type omni_mllm + safetensors, sharded or not),
  so a stage can continue training from an export (e.g. one downloaded from the Hub).
Weights are read with safetensors only and loaded strictly: every OmniModel parameter must come
from the folder, except an LM output embedding tied to its input embedding. `overrides` (dotted
key=value on the model config) switch options that keep the weights' shapes, e.g.
`llm.norm_head=true`, `llm.max_z_loss=2e-4`, `video.max_frames=8`; the LM's architecture is fixed.

Integrity: every writer records the sha256 of each weights file in the folder's config
(`weights_sha256`: omni_config.json, or an export's config.json); the loader checks it, refuses
NaN/inf weights and floating tensors of another dtype than the config says, naming the file and
the tensor. `verify=False` or OMNI_VERIFY_WEIGHTS=0 skips the hash and the NaN scan (for speed).
"""
from __future__ import annotations

import json
from pathlib import Path

from omni.config import ConfigError, apply_overrides
from omni.files import atomic_dir, file_sha256
from omni.hf.configuration_omni import MODEL_TYPE
from omni.model.integrity import CHECKSUMS, SKIP_HINT, check_recorded, verify_by_default
from omni.model.omni_model import (
    CONFIG,
    TOKENIZER_DIR,
    WEIGHTS,
    OmniModel,
    attention_backend,
)
from omni.model.speech import load_codec
from omni.presets import model_config_from_dict, model_config_to_dict

HF_CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# where an fsdp2 / DeepSpeed checkpoint keeps its sharded weights (omni/train/engines.py): no model folder
SHARDED_WEIGHTS = ("dcp", "deepspeed")


def sharded_checkpoint(path: str | Path) -> Path | None:
    """The fsdp2 / DeepSpeed checkpoint `path` is (checkpoints/step-N with dcp/ or deepspeed/ inside),
    or a stage folder's newest one when the stage has no final/ yet; None for anything else."""
    path = Path(path)
    steps = [path] if path.name.startswith("step-") else sorted((path / "checkpoints").glob("step-*"))
    sharded = [s for s in steps if any((s / name).is_dir() for name in SHARDED_WEIGHTS)]
    return sharded[-1] if sharded and not (path / "final" / WEIGHTS).is_file() else None


def adapter_checkpoint(path: str | Path) -> Path | None:
    """The LoRA stage checkpoint `path` is (or a stage folder's newest one, without final/ yet):
    its weights have the adapters' names beside the base layers', which no model folder has."""
    from safetensors import safe_open

    path = Path(path)
    steps = [path] if path.name.startswith("step-") else sorted((path / "checkpoints").glob("step-*"))
    if not steps or (path / "final" / WEIGHTS).is_file() or not (steps[-1] / WEIGHTS).is_file():
        return None
    try:
        with safe_open(str(steps[-1] / WEIGHTS), framework="pt") as f:
            adapted = any(".lora_" in k for k in f.keys())
    except Exception:  # noqa: BLE001 - a torn file is reported by the load that follows
        return None
    return steps[-1] if adapted else None


def consolidate_first(path: str | Path) -> str:
    """What to say about a checkpoint that is not a model folder where one is needed ('' when
    `path` is none): a sharded one (fsdp2, DeepSpeed) or a LoRA stage's (adapters not merged)."""
    ckpt = sharded_checkpoint(path)
    if ckpt is not None:
        return (f"{ckpt} is an fsdp2/DeepSpeed checkpoint (sharded weights, no model folder): "
                f"run `omni consolidate {ckpt} --out DIR` first, then use DIR")
    ckpt = adapter_checkpoint(path)
    if ckpt is not None:
        return (f"{ckpt} is a LoRA stage's checkpoint (adapters beside the base, not merged): "
                f"run `omni consolidate {ckpt} --out DIR` first (it merges them), then use DIR")
    return ""


def weight_checksums(model_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} of a folder's weights files (what a writer records in the config)."""
    return {f.name: file_sha256(f) for f in weight_files(model_dir)}


def is_exported_dir(path: str | Path) -> bool:
    """True for a folder written by `omni export` (config.json of model_type omni_mllm)."""
    config = Path(path) / HF_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model folder or an export, in index order; never anything else."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        try:
            names = list(dict.fromkeys(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{model_dir / INDEX}: not a safetensors index ({type(e).__name__}: {e}); "
                              "the folder is damaged: copy or export it again") from None
        files = [model_dir / n for n in names]
    elif (model_dir / WEIGHTS).is_file():
        files = [model_dir / WEIGHTS]
    else:
        raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} and no {INDEX}; not a model folder")
    bad = [f.name for f in files if f.suffix != ".safetensors" or not f.is_file()]
    if bad:
        raise FileNotFoundError(f"{model_dir}: weight files {bad} missing or not safetensors")
    return files


def read_weights(model_dir: str | Path, checksums: dict | None = None, dtype: str | None = None,
                 verify: bool = True, floating: set[str] = frozenset()) -> dict:
    """Every tensor of the folder's weights files. `checksums` ({file: sha256}, from the config) and
    `dtype` (the floating dtype the config names) are checked where given, and the tensors named in
    `floating` (the model's floating parameters) must be floating; `verify` also refuses NaN/inf
    values. Every error names the file (and the tensor)."""
    import torch
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if verify and checksums is not None:
        unlisted = sorted({f.name for f in files} - set(checksums))
        if unlisted:
            raise ConfigError(f"{model_dir}: weights files {unlisted} have no recorded checksum ({CHECKSUMS} in "
                              f"the config); they were added after saving {SKIP_HINT}")
    state = {}
    for f in files:
        check_recorded(f, checksums, verify)
        try:
            part = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a torn or forged file
            raise ConfigError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                              "truncated or damaged: copy or export it again") from None
        dup = set(part) & set(state)
        if dup:
            raise ConfigError(f"{f}: keys {sorted(dup)[:3]} also appear in another shard")
        for k, t in part.items():
            if k in floating and not t.is_floating_point():
                raise ConfigError(f"{f}: tensor {k} is stored as {t.dtype}, not a floating dtype like the model's "
                                  "parameter: the file was altered; copy or export it again")
            if dtype is not None and t.is_floating_point() and str(t.dtype).removeprefix("torch.") != dtype:
                raise ConfigError(f"{f}: tensor {k} is {str(t.dtype).removeprefix('torch.')} but the config says "
                                  f"{dtype}: the file does not belong to this config")
            if verify and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ConfigError(f"{f}: tensor {k} holds NaN or inf values; the model diverged or the file is "
                                  f"damaged: load an earlier checkpoint {SKIP_HINT}")
        state.update(part)
    return state


def load_model(path: str | Path, overrides: list[str] = (), weights: bool = True, verify: bool | None = None):
    """(OmniModel, tokenizer) from any model folder omni writes; see the module docstring.
    `weights=False`: the architecture only (built under `torch.device("meta")` by ranks that
    receive the weights from rank 0, omni/train/engines.py). `verify`: check the recorded
    hashes and scan for NaN/inf (default: yes, unless OMNI_VERIFY_WEIGHTS=0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from omni.hf.mapping import model_config_from_hf

    path = Path(path)
    if any(o.startswith(("llm.hf_config", "llm.pretrained")) for o in overrides):
        raise ConfigError(f"{path}: the LLM's architecture is fixed once trained; "
                          "drop llm.hf_config/llm.pretrained overrides")
    if is_exported_dir(path):
        meta = json.loads((path / HF_CONFIG).read_text())
        cfg, text, token_ids = model_config_from_hf(meta)
        data, where, dtype = model_config_to_dict(cfg), path / HF_CONFIG, meta.get("dtype") or meta.get("torch_dtype")
    elif consolidate_first(path):
        raise ConfigError(consolidate_first(path))
    elif (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        meta = _read_json(path / CONFIG)
        data, text, token_ids, where = meta["model"], meta["llm_config"], meta["token_ids"], path / CONFIG
        dtype = None
    else:
        raise FileNotFoundError(f"{path}: not an omni model folder ({CONFIG} + {WEIGHTS}) nor an omni export "
                                f"({HF_CONFIG} with model_type {MODEL_TYPE!r})")
    saved_talker = bool((data.get("talker") or {}).get("enabled"))
    cfg = model_config_from_dict(apply_overrides(data, list(overrides), where=f"{where} with overrides"))
    text = dict(text)
    llm_config = AutoConfig.for_model(text.pop("model_type"), **text)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attention_backend(cfg.llm.attn_implementation))
    model = OmniModel(cfg, llm, token_ids, pretrained=False)
    # a talker switched on by an override (talker.enabled=true) for a model saved without one starts fresh
    fresh = ("talker.",) if cfg.talker.enabled and not saved_talker else ()
    if weights:
        verify = verify_by_default() if verify is None else verify
        floating = {k for k, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()}
        state = read_weights(path, meta.get(CHECKSUMS), dtype if isinstance(dtype, str) else None, verify, floating)
        _load_state(model, state, path, overrides, fresh)
    if weights and cfg.talker.enabled:  # not for an architecture-only skeleton (omni plan, ranks fed by rank 0)
        model.codec = load_codec(cfg, path)
    tokenizer = _saved_tokenizer(path) if where.name == HF_CONFIG else AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
    return model, tokenizer


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); the folder is damaged: copy or save it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _saved_tokenizer(path: Path):
    """The tokenizer an export saved, by the class its tokenizer_config.json names. AutoTokenizer
    would read config.json instead (the omni model type, whose remote code it asks to run), and
    given the LLM's config it builds that LLM's default tokenizer class, not the saved one."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    cls = tokenizer_class_from_name(name) if name else None
    if cls is None:
        raise ConfigError(f"{path / 'tokenizer_config.json'}: tokenizer_class {name!r} is not a transformers "
                          "tokenizer; export the model again with omni export")
    return cls.from_pretrained(path)


def _load_state(model, state: dict, path: Path, overrides, fresh: tuple[str, ...] = ()) -> None:
    """Strict: every parameter comes from `state`, except an LM output embedding tied to its input
    and the parts named by the prefixes in `fresh` (new parts, left at their initialisation)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        after = f" after overrides {list(overrides)}" if overrides else ""
        raise ConfigError(f"{path}: weights do not fit the model config{after}: {e}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in result.missing_keys if (k not in params or params[k].data_ptr() not in loaded_ptrs)
               and not k.startswith(fresh)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")


def save_model_dir(model, tokenizer, target: str | Path, state_dict: dict | None = None) -> Path:
    """The `final/` folder; `state_dict`: full weights gathered from a sharded engine."""
    with atomic_dir(target) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, tokenizer)
        else:
            model.save_pretrained(tmp, tokenizer, state_dict=state_dict)
    return Path(target)
