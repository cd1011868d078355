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
"""
from __future__ import annotations

import json
from pathlib import Path

from omni.config import ConfigError, apply_overrides
from omni.files import atomic_dir
from omni.hf.configuration_omni import MODEL_TYPE
from omni.model.omni_model import (
    CONFIG,
    TOKENIZER_DIR,
    WEIGHTS,
    OmniModel,
    attention_backend,
)
from omni.presets import model_config_from_dict, model_config_to_dict

HF_CONFIG = "config.json"
INDEX = "model.safetensors.index.json"


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
        index = json.loads((model_dir / INDEX).read_text())
        names = list(dict.fromkeys(index["weight_map"].values()))
        files = [model_dir / n for n in names]
    elif (model_dir / WEIGHTS).is_file():
        files = [model_dir / WEIGHTS]
    else:
        raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} and no {INDEX}; not a model folder")
    bad = [f.name for f in files if f.suffix != ".safetensors" or not f.is_file()]
    if bad:
        raise FileNotFoundError(f"{model_dir}: weight files {bad} missing or not safetensors")
    return files


def read_weights(model_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(model_dir):
        part = load_file(str(f))
        dup = set(part) & set(state)
        if dup:
            raise ConfigError(f"{f}: keys {sorted(dup)[:3]} also appear in another shard")
        state.update(part)
    return state


def load_model(path: str | Path, overrides: list[str] = (), weights: bool = True):
    """(OmniModel, tokenizer) from any model folder omni writes; see the module docstring.
    `weights=False`: the architecture only (built under `torch.device("meta")` by ranks that
    receive the weights from rank 0, omni/train/engines.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from omni.hf.mapping import model_config_from_hf

    path = Path(path)
    if any(o.startswith(("llm.hf_config", "llm.pretrained")) for o in overrides):
        raise ConfigError(f"{path}: the LLM's architecture is fixed once trained; "
                          "drop llm.hf_config/llm.pretrained overrides")
    if is_exported_dir(path):
        cfg, text, token_ids = model_config_from_hf(json.loads((path / HF_CONFIG).read_text()))
        data, where = model_config_to_dict(cfg), path / HF_CONFIG
    elif (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        meta = json.loads((path / CONFIG).read_text())
        data, text, token_ids, where = meta["model"], meta["llm_config"], meta["token_ids"], path / CONFIG
    else:
        raise FileNotFoundError(f"{path}: not an omni model folder ({CONFIG} + {WEIGHTS}) nor an omni export "
                                f"({HF_CONFIG} with model_type {MODEL_TYPE!r})")
    cfg = model_config_from_dict(apply_overrides(data, list(overrides), where=f"{where} with overrides"))
    text = dict(text)
    llm_config = AutoConfig.for_model(text.pop("model_type"), **text)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attention_backend(cfg.llm.attn_implementation))
    model = OmniModel(cfg, llm, token_ids, pretrained=False)
    if weights:
        _load_state(model, read_weights(path), path, overrides)
    tokenizer = _saved_tokenizer(path) if where.name == HF_CONFIG else AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
    return model, tokenizer


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


def _load_state(model, state: dict, path: Path, overrides) -> None:
    """Strict: every parameter comes from `state`, except an LM output embedding tied to its input."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        after = f" after overrides {list(overrides)}" if overrides else ""
        raise ConfigError(f"{path}: weights do not fit the model config{after}: {e}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
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
