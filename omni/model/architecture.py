"""The LLM's architecture, derived one way wherever a model is built: rank 0 (which reads the
weights), the meta-device skeletons of the other ranks, `omni plan` and the model table.

- `llm.pretrained` set (a Hugging Face name or a local folder): its own `config.json`, read with
  `AutoConfig.from_pretrained` (no weights read). `llm.hf_config` may list keys the run expects; one
  that disagrees with the checkpoint's config is an error, never a silent override.
- `llm.pretrained` null (random init): `llm.hf_config`, a full transformers config with `model_type`.

`check_same_model` then compares what every rank built, before the engine's first collective, so a
rank that found another config (another cache, another local folder) stops the run with the keys that
differ instead of broadcasting weights into the wrong shapes.
"""
from __future__ import annotations

import hashlib
import json

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from omni.config import ConfigError

# config entries that say where a config came from or how it was saved, not what the model is
_BOOKKEEPING_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                     "_commit_hash", "_attn_implementation_autoset", "use_cache")


def llm_config(cfg):
    """The transformers config of `cfg.llm` (an omni.presets.ModelConfig's), see the module docstring."""
    from transformers import AutoConfig

    llm = cfg.llm
    if llm.pretrained is None:
        kwargs = dict(llm.hf_config)
        if "model_type" not in kwargs:
            raise ConfigError("llm.hf_config: a random-init LLM (llm.pretrained: null) needs a full transformers "
                              "config with model_type (e.g. qwen2); or name a checkpoint in llm.pretrained")
        try:
            return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        except (TypeError, ValueError, StrictDataclassError) as e:
            raise ConfigError(f"llm.hf_config: not a valid transformers config "
                              f"({str(e).splitlines()[-1].strip()})") from None
    try:
        config = AutoConfig.from_pretrained(llm.pretrained)
    except (OSError, ValueError) as e:
        raise ConfigError(f"llm.pretrained={llm.pretrained}: cannot read its config.json ({str(e).splitlines()[0]}); "
                          "point it at a local checkpoint folder, or download the config once "
                          "(e.g. `hf download NAME config.json`) where the hub is reachable") from None
    conflicts = _conflicts(config, llm.hf_config)
    if conflicts:
        raise ConfigError(f"llm.hf_config disagrees with llm.pretrained={llm.pretrained}'s config.json in "
                          f"{'; '.join(conflicts)}: the architecture comes from the checkpoint; drop those keys "
                          "(llm.hf_config={} takes it as it is)")
    return config


def _conflicts(config, expected: dict) -> list[str]:
    """`key: expected vs checkpoint` for every entry the checkpoint's config contradicts: the keys
    `expected` sets, and those it changes from the config class's defaults through them (compared
    after transformers normalises both, e.g. rope_theta into rope_parameters)."""
    if not expected:
        return []
    if expected.get("model_type", config.model_type) != config.model_type:
        return [f"model_type: {expected['model_type']!r} vs {config.model_type!r}"]
    kwargs = {k: v for k, v in expected.items() if k != "model_type"}
    try:
        want, default = type(config)(**kwargs).to_dict(), type(config)().to_dict()
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ConfigError(f"llm.hf_config: not a valid {config.model_type} config "
                          f"({str(e).splitlines()[-1].strip()})") from None
    base = config.to_dict()
    touched = {k for k in want if k in kwargs or want[k] != default.get(k)}
    return [f"{k}: {want[k]!r} vs {base.get(k)!r}" for k in sorted(touched)
            if k not in _BOOKKEEPING_KEYS and want[k] != base.get(k)]


def with_architecture(cfg, config):
    """`cfg` with `llm.hf_config` set to the built LLM's whole config, so a model's own config
    (what a model folder saves, what the processor reads max_position_embeddings from) says what
    it is without asking the hub again; it agrees with `llm.pretrained` by construction."""
    import dataclasses

    arch = {k: v for k, v in config.to_diff_dict().items() if k not in _BOOKKEEPING_KEYS and not k.startswith("_")}
    arch["model_type"] = config.model_type
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hf_config=arch))


def summary(model: nn.Module) -> dict:
    """What two ranks must agree on before exchanging weights: the LLM's config (without where it
    came from) and a digest of every parameter's and buffer's name, shape and dtype."""
    llm_cfg = {k: v for k, v in model.llm.config.to_dict().items() if k not in _BOOKKEEPING_KEYS
               and not k.startswith("_")}
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in
               [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]]
    digest = hashlib.sha256(json.dumps(tensors).encode()).hexdigest()
    return {"llm_config": json.loads(json.dumps(llm_cfg, default=str)), "tensors": digest}


def disagreements(summaries: list[dict]) -> list[str]:
    """One line per rank whose `summary` differs from rank 0's."""
    first, lines = summaries[0], []
    for rank, other in enumerate(summaries[1:], start=1):
        a, b = first["llm_config"], other["llm_config"]
        keys = [f"{k}: {b.get(k)!r} (rank 0: {a.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if keys:
            lines.append(f"rank {rank}: LLM config {'; '.join(keys[:6])}")
        elif other["tensors"] != first["tensors"]:
            lines.append(f"rank {rank}: parameter names, shapes or dtypes")
    return lines


def check_same_model(world, model: nn.Module) -> None:
    """Every rank built the same architecture as rank 0, or all ranks stop with the differences
    (`world`: omni.distributed.World; one small all_gather, before the engine's first collective)."""
    if world.size == 1:
        return
    lines = disagreements(world.gather(summary(model)))
    if lines:
        raise ConfigError("ranks built different models, so rank 0's weights cannot be sent to them: "
                          + " | ".join(lines) + ". Every rank must see the same llm.pretrained (same folder or "
                          "same hub revision in its cache) and the same model overrides")

