"""Load an exported Hugging Face folder back into omni (`init_from: <export dir>`).

`load_exported(dir, overrides)` returns the same `(OmniModel, tokenizer)` pair as
`OmniModel.from_pretrained` does for a stage's `final/` folder, so a stage can continue
training from an export (e.g. one downloaded from the Hub). Weights are read with safetensors
only (single file or the shards listed in `model.safetensors.index.json`) and loaded strictly:
every OmniModel parameter must come from the export, except an LM output embedding tied to
its input embedding. `overrides` behave as in `OmniModel.from_pretrained` (anything that keeps
the weights' shapes; the LM's architecture is fixed).
"""
from __future__ import annotations

import json
from pathlib import Path

from omni.config import ConfigError, apply_overrides
from omni.files import atomic_dir
from omni.hf.configuration_omni import MODEL_TYPE

HF_CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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
    """The safetensors files of an export, in index order; never anything else."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        names = list(dict.fromkeys(index["weight_map"].values()))
        files = [model_dir / n for n in names]
    elif (model_dir / SINGLE).is_file():
        files = [model_dir / SINGLE]
    else:
        raise FileNotFoundError(f"{model_dir}: no {SINGLE} and no {INDEX}; not an exported model folder")
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


def load_exported(model_dir: str | Path, overrides: list[str] = (), weights: bool = True):
    """(OmniModel, tokenizer) from an export folder; see the module docstring. `weights=False`:
    the architecture only (as `OmniModel.from_pretrained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from omni.hf.mapping import model_config_from_hf
    from omni.model.omni_model import OmniModel, attention_backend
    from omni.presets import model_config_from_dict, model_config_to_dict

    model_dir = Path(model_dir)
    if not is_exported_dir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not an omni export (needs {HF_CONFIG} with model_type {MODEL_TYPE!r})")
    if any(o.startswith(("llm.hf_config", "llm.pretrained")) for o in overrides):
        raise ConfigError(f"{model_dir}: the LLM's architecture is fixed once trained; "
                          "drop llm.hf_config/llm.pretrained overrides")
    cfg, text, token_ids = model_config_from_hf(json.loads((model_dir / HF_CONFIG).read_text()))
    cfg = model_config_from_dict(apply_overrides(model_config_to_dict(cfg), list(overrides),
                                                 where=f"{model_dir / HF_CONFIG} with overrides"))
    text = dict(text)
    llm_config = AutoConfig.for_model(text.pop("model_type"), **text)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attention_backend(cfg.llm.attn_implementation))
    model = OmniModel(cfg, llm, token_ids, pretrained=False)
    # config= keeps AutoTokenizer from reading config.json, whose remote-code auto_map it would ask about
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=llm_config)
    if not weights:
        return model, tokenizer
    state = read_weights(model_dir)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"{model_dir}: weights do not fit the model config: {e}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{model_dir}: weights do not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return model, tokenizer


def load_model_dir(model_dir: str | Path, overrides: list[str] = ()):
    """Either kind of model folder: an omni export, or a stage's `final/` / a checkpoint."""
    from omni.model.omni_model import OmniModel

    if is_exported_dir(model_dir):
        return load_exported(model_dir, overrides)
    return OmniModel.from_pretrained(model_dir, overrides)


def save_model_dir(model, tokenizer, target: str | Path, state_dict: dict | None = None) -> Path:
    """The `final/` folder; `state_dict`: full weights gathered from a sharded engine."""
    with atomic_dir(target) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, tokenizer)
        else:
            model.save_pretrained(tmp, tokenizer, state_dict=state_dict)
    return Path(target)
