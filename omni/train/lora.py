"""LoRA on any stage, with peft: a stage's `lora:` section (LoraSection) puts low-rank adapters on
the Linear layers whose weights its globs name, over omni's own parameter names.

peft's `inject_adapter_in_model` changes the model in place (no wrapper), so every other
parameter keeps its name and `trainable:` globs, engines (ddp, fsdp2 units, DeepSpeed) and
resumable checkpoints see an OmniModel as always: a targeted layer's weight becomes
`<layer>.base_layer.weight` (frozen) beside `<layer>.lora_A.default.weight` and
`<layer>.lora_B.default.weight` (trained). `trainable:` globs train other parameters fully
alongside (e.g. the projectors).

A LoRA stage's `final/` is the merged model (peft's own `merge` of every adapter into its base
layer; plain parameter names, so chat, eval, export and the next stage's `init_from` read it
like any other), and `final/adapter/` the adapter in peft's format: the LoRA weights plus, as
peft's `modules_to_save`, the modules `trainable:` trained fully. `peft.PeftModel.from_pretrained`
loads it on top of the stage's starting model (its `init_from`, exported) and gives the merged
model's logits.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from omni.config import ConfigError
from omni.train.qlora import is_4bit

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"                # final/adapter: the peft adapter folder
ADAPTER_NAME = "default"               # peft's adapter name inside the model
ADAPTER_GLOBS = ["*.lora_A.*", "*.lora_B.*"]  # the adapter's parameters, always trained
PEFT_PREFIX = "base_model.model."      # peft's key prefix in adapter_model.safetensors (PeftModel's names)


@dataclass
class LoraSection:
    rank: int = 0                       # 0: no LoRA; else the adapters' rank r
    alpha: float = 16.0                 # scaling alpha / r
    dropout: float = 0.0                # dropout on the adapter's input
    targets: list[str] = field(default_factory=list)  # parameter-name globs; the Linear layers owning matched weights get adapters
    qlora: bool = False                 # the LLM's base weights in 4-bit NF4 (bitsandbytes; omni/train/qlora.py)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError("lora.rank must be >= 0 (0: no LoRA)")
        if not self.rank:
            if self.targets or self.qlora:
                raise ConfigError("lora: targets/qlora given but lora.rank is 0; set lora.rank (e.g. 8) to use LoRA")
            return
        if not self.targets:
            raise ConfigError("lora.targets: list parameter globs of the layers to adapt, e.g. "
                              "'llm.model.layers.*.self_attn.*' and 'llm.model.layers.*.mlp.*'")
        if self.alpha <= 0:
            raise ConfigError("lora.alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("lora.dropout must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def target_modules(model: nn.Module, globs: list[str]) -> list[str]:
    """Full names of the Linear layers owning a parameter that a glob matches (what peft's
    `target_modules` takes as a list); a glob that names no Linear layer's parameter is an error."""
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear or is_4bit(m)}
    params = [n for n, _ in model.named_parameters()]
    chosen, unused = set(), []
    for g in globs:
        hits = {n.rsplit(".", 1)[0] for n in params if fnmatch.fnmatchcase(n, g)} & linears
        if not hits:
            unused.append(g)
        chosen |= hits
    if unused:
        prefixes = sorted({".".join(n.split(".")[:2]) for n in params})
        raise ConfigError(f"lora.targets: glob(s) {unused} match no Linear layer's parameter (LoRA adapts Linear "
                          f"layers); parameter prefixes: {prefixes}")
    return sorted(chosen)


def lora_config(section: LoraSection, targets: list[str], modules_to_save: list[str] | None = None,
                base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets, modules_to_save=modules_to_save or None,
                      base_model_name_or_path=base)


def apply_lora(model: nn.Module, section: LoraSection) -> list[str]:
    """Adapters on `model` (an OmniModel) in place; returns the adapted layers' names. On the meta
    device (ranks that receive weights from rank 0) the adapters are made on meta too."""
    from peft import inject_adapter_in_model

    targets = target_modules(model, section.targets)
    inject_adapter_in_model(lora_config(section, targets), model, adapter_name=ADAPTER_NAME)
    n = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    log.info("lora: rank %d, alpha %g on %d Linear layers (%s ...): %d adapter parameters", section.rank,
             section.alpha, len(targets), ", ".join(targets[:2]), n)
    return targets


def trainable_globs(section: LoraSection, globs: list[str]) -> list[str]:
    """A stage's `trainable:` globs plus, with LoRA, the adapters' parameters."""
    return list(globs) + (ADAPTER_GLOBS if section.enabled else [])


def check_full_training(trained: list[str]) -> list[str]:
    """The parameters `trainable:` trains fully (the adapters left out); one inside an adapted
    layer would be neither merged nor peft-loadable, so it is refused."""
    full = [n for n in trained if ".lora_" not in n]
    inside = [n for n in full if ".base_layer." in n]
    if inside:
        raise ConfigError(f"trainable: {inside[:3]} belong to layers lora.targets adapts; leave them out of "
                          "trainable (the adapter trains those layers) or out of lora.targets")
    return full


def save_lora_final(model: nn.Module, skeleton: nn.Module, tokenizer, target: Path, state: dict | None,
                    section: LoraSection, targets: list[str], full_trained: list[str], base: str | None) -> Path:
    """`final/` of a LoRA stage: the merged model folder and `final/adapter/` (peft's format).
    `model`: the trained model (its state is complete unless `state`, the weights gathered from a
    sharded engine, is given; merging writes into its base weights); `skeleton`: the same
    architecture on the meta device, where the adapters are made again and peft merges the tensors;
    `targets`: the adapted layers; `full_trained`: the parameters trained fully; `base`: the
    stage's starting model folder (recorded in the adapter's config)."""
    from peft import inject_adapter_in_model
    from safetensors.torch import save_file

    from omni.files import atomic_dir
    from omni.model.load import save_model_dir
    from omni.train.engines import retie

    if state is None:  # copies (ties kept): merging writes into the base weights
        state = retie(model, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    adapter = _adapter_state(model, state, full_trained)
    modules_to_save = sorted({n.rsplit(".", 1)[0] for n in full_trained})
    inject_adapter_in_model(lora_config(section, targets), skeleton, adapter_name=ADAPTER_NAME)
    merged = merge(skeleton, state)
    final = save_model_dir(skeleton, tokenizer, target, merged)
    with atomic_dir(final / ADAPTER_DIR) as tmp:
        lora_config(section, targets, modules_to_save, base).save_pretrained(tmp)
        save_file(adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    log.info("lora: merged model -> %s, adapter (%d tensors) -> %s", final, len(adapter), final / ADAPTER_DIR)
    return final


def _adapter_state(model: nn.Module, state: dict, full_trained: list[str]) -> dict:
    """peft's adapter file: the LoRA weights (`get_peft_model_state_dict`) and the fully trained
    modules' tensors (as `modules_to_save`, under their own names), with PeftModel's key prefix."""
    from peft import get_peft_model_state_dict

    lora = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME)
    owners = tuple(n.rsplit(".", 1)[0] + "." for n in full_trained)
    kept = {k: v for k, v in state.items() if k.startswith(owners)} if owners else {}
    return {PEFT_PREFIX + k: v.contiguous() for k, v in {**lora, **kept}.items()}


def merge(skeleton: nn.Module, state: dict) -> dict:
    """The merged weights, with plain parameter names: `state` (adapter names) is loaded into the
    meta-device `skeleton` by assignment, peft merges every adapter into its base layer, and the
    adapters' tensors are dropped."""
    from peft.tuners.lora import LoraLayer

    skeleton.load_state_dict(state, assign=True)
    for m in skeleton.modules():
        if isinstance(m, LoraLayer):
            m.merge(adapter_names=[ADAPTER_NAME])
    return {k.replace(".base_layer.", "."): v for k, v in skeleton.state_dict().items() if ".lora_" not in k}
