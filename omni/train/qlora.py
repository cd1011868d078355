"""QLoRA (`lora.qlora: true`): the LLM's Linear layers (the LM head aside) held as bitsandbytes
4-bit NF4 weights with double-quantised statistics, frozen, under the stage's LoRA adapters.

The 4-bit base is a function of the stage's starting weights (NF4 quantisation is deterministic),
so it is never written: a resumable checkpoint holds every other tensor (adapters, fully trained
modules, the rest of the model), and a resume quantises its `init_from` again. The merged
`final/` and `omni consolidate` dequantise the base (peft's `dequantize_bnb_weight`) and merge the
adapters into it, so the merged model computes what the trained adapter model computed.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from omni.config import ConfigError

log = logging.getLogger(__name__)
QUANT_TYPE = "nf4"


def check_qlora(engine: str) -> None:
    """QLoRA needs bitsandbytes and runs on the ddp engine (one process or torchrun)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.qlora: needs the bitsandbytes package; install it (pip install 'omni[qlora]') "
                          "or set lora.qlora: false")
    if engine != "ddp":
        raise ConfigError(f"lora.qlora: the 4-bit base runs on engine ddp (one process or torchrun), not {engine}: "
                          "its packed 4-bit weights cannot be sharded by fsdp2 or DeepSpeed; set engine: ddp")


# bytes per NF4 weight: 4 bits, one 8-bit absmax per block of 64, one fp32 scale per 256 of those
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def base_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name in model.llm, layer) of the Linear layers QLoRA holds in 4 bits: the LLM's, the LM head aside."""
    llm = model.llm
    head = llm.get_output_embeddings()
    return [(name, m) for name, m in llm.named_modules() if type(m) is nn.Linear and m is not head]


def quantize_base(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the LLM's Linear layers (the LM head aside: it scores every token, as in the QLoRA
    paper) of `model` (an OmniModel) by frozen bitsandbytes `Linear4bit` layers holding the same
    weights in NF4, computing in `compute_dtype` (the stage's precision). Returns the number replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, linear in base_linears(model):
        with torch.device("meta"):
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE)
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type=QUANT_TYPE, module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        # on a CPU with avx512_bf16, bitsandbytes repacks the weight for a bf16 kernel at the first
        # eval-mode no-grad forward: ~1e-2 off the training kernel, and a layout dequantize_4bit (the
        # merge into final/) cannot read. One layout and one kernel for training, eval and merging.
        q.support_avx512bf16_for_cpu = False
        model.llm.set_submodule(name, q.to(linear.weight.device))  # .to quantises the weight
        replaced += 1
    log.info("qlora: %d LLM Linear layers held in 4-bit %s (compute %s)", replaced, QUANT_TYPE,
             str(compute_dtype).removeprefix("torch."))
    return replaced


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (a Linear subclass peft adapts too), known without importing
    bitsandbytes, which stages without QLoRA need not have."""
    return isinstance(module, nn.Linear) and type(module).__name__ == "Linear4bit"


def _quantized(model: nn.Module) -> dict[str, nn.Parameter]:
    """{state-dict name of a 4-bit weight: the parameter} in `model`."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if is_4bit(m)}


def quantized_keys(model: nn.Module) -> set[str]:
    """State-dict names of the 4-bit base: each 4-bit weight and its quantisation statistics."""
    names = _quantized(model)
    if not names:  # every stage but a QLoRA one: no state dict walked at each checkpoint
        return set()
    return {k for k in model.state_dict() if any(k == w or k.startswith(w + ".") for w in names)}


def without_base(model: nn.Module) -> dict | None:
    """What a checkpoint writes of `model`: its state without the 4-bit base; None when it has none."""
    drop = quantized_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in drop} if drop else None


def dequantized_state(model: nn.Module, state: dict) -> dict:
    """`state` (of `model`) with each 4-bit weight dequantised to its original dtype and its
    statistics dropped: the full-precision weights the trained model computed with."""
    from peft.utils.integrations import dequantize_bnb_weight

    weights = _quantized(model)
    drop = quantized_keys(model)
    out = {k: v for k, v in state.items() if k not in drop}
    for name, w in weights.items():
        out[name] = dequantize_bnb_weight(w, w.quant_state).to("cpu", w.quant_state.dtype)
    return out
