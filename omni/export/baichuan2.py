"""Write a Baichuan-2-style checkpoint as a transformers Llama folder for omni's LLM slot.

The key/weight/config conversion is omni.hf.baichuan2_convert; this writes the folder:

    python -m omni.export.baichuan2 SRC_DIR OUT_DIR

writes a transformers Llama folder (weights and config.json, no tokenizer: Baichuan 2's needs remote
code) and prints the model overrides that put it in the LLM slot
(`llm.pretrained=OUT_DIR llm.norm_head=true llm.hf_config={}`: the architecture is OUT_DIR's config).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omni.config import ConfigError
from omni.files import atomic_dir
from omni.hf.baichuan2_convert import llm_overrides, load_baichuan2_as_llama


def convert_baichuan2(src: str | Path, out: str | Path, max_shard_size: str = "5GB") -> list[str]:
    """Write a transformers LlamaForCausalLM folder converted from `src`; returns the omni
    model overrides that load it into the LLM slot with Baichuan 2's NormHead."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM

    llama_cfg, state = load_baichuan2_as_llama(src)
    with torch.device("meta"):  # strict check of the mapping against the real Llama parameter names
        expected = set(AutoModelForCausalLM.from_config(llama_cfg).state_dict())
    expected = {k for k in expected if not k.endswith("inv_freq")}
    if expected != set(state):
        raise ConfigError(f"{src}: converted keys differ from LlamaForCausalLM's: missing "
                          f"{sorted(expected - set(state))[:5]}, extra {sorted(set(state) - expected)[:5]}")
    out = Path(out)
    with atomic_dir(out) as tmp:
        llama_cfg.architectures = ["LlamaForCausalLM"]
        llama_cfg.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        (tmp / "omni_baichuan2.json").write_text(json.dumps(
            {"converted_from": str(src), "norm_head": True, "overrides": llm_overrides(out)}, indent=2))
    return llm_overrides(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m omni.export.baichuan2", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Baichuan-2-style checkpoint folder (config.json + safetensors)")
    p.add_argument("out", help="output folder (a transformers Llama checkpoint)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    overrides = convert_baichuan2(args.src, args.out, args.max_shard_size)
    print("model overrides for the LLM slot:\n  " + " ".join(f"'{o}'" for o in overrides))
    print("no tokenizer was written (Baichuan 2's is remote code): also set 'tokenizer=NAME_OR_DIR' to a "
          "transformers tokenizer with the checkpoint's vocabulary")


if __name__ == "__main__":
    main()
