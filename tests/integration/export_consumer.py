"""Consumer side of the export test: loads exports the way a Hub user would, without omni.

Run by tests/integration/test_export.py as `CONSUMER_PYTHON -I export_consumer.py SPEC OUT` in a
temporary cwd, where CONSUMER_PYTHON belongs to a virtualenv that sees torch, transformers,
open_clip, whisper, decord and PyAV but in which omni is not installed. This file imports nothing
from omni; it checks that omni, encoders and projectors cannot be found at start and were never
imported at the end, then writes what the Auto classes produced for the test to compare (for an
export that speaks, also the talker's codes and waves for the generated answers).
"""
import importlib.util
import json
import sys
from pathlib import Path

PROJECT = ("omni", "encoders", "projectors")


def main(spec_path: str, out_dir: str) -> None:
    findable = {name: importlib.util.find_spec(name) is not None for name in PROJECT}
    assert not any(findable.values()), f"the project is importable in the consumer env: {findable}"

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor

    torch.set_num_threads(2)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    inputs = spec["inputs"]
    images = [Image.open(p) for p in inputs["images"]]
    audio = [np.load(p) for p in inputs["audio"]]
    report = {"findable_at_start": findable, "exports": {}}
    for case in spec["exports"]:
        auto = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoModel": AutoModel}[case["auto"]]
        model, info = auto.from_pretrained(case["dir"], trust_remote_code=True, use_safetensors=True,
                                           output_loading_info=True)
        model.eval()
        processor = AutoProcessor.from_pretrained(case["dir"], trust_remote_code=True)
        batch = processor(messages=inputs["messages"], images=images, videos=inputs["videos"], audio=audio,
                          add_generation_prompt=True, padding_side="left")
        with torch.no_grad():
            logits = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=spec["max_new_tokens"])
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        arrays = {k: v.numpy() for k, v in batch.items()}
        arrays |= {"logits": logits.numpy(), "new_tokens": new_tokens.numpy(), "prompt_echo":
                   generated[:, : batch["input_ids"].shape[1]].numpy()}
        decoded = processor.batch_decode(new_tokens, skip_special_tokens=True)
        report["exports"][case["name"]] = {
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
            "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
            "decoded": decoded,
        }
        if case.get("speak"):  # each conversation with its generated answer, spoken by the talker
            said = [conv + [{"role": "assistant", "content": text}] for conv, text in zip(inputs["messages"], decoded)]
            spoken = processor(messages=said, images=images, videos=inputs["videos"], audio=audio,
                               return_labels=True, padding_side="right")
            codes = model.speech_codes(**spoken)
            waves, rate = model.generate_speech(**spoken)
            arrays |= {f"codes_{i}": c.numpy() for i, c in enumerate(codes)}
            arrays |= {f"wave_{i}": w for i, w in enumerate(waves)}
            report["exports"][case["name"]] |= {"sample_rate": rate, "codec_class": type(model.codec).__name__}
        np.savez(out / f"{case['name']}.npz", **arrays)
    report["project_modules_imported"] = sorted(
        m for m in sys.modules if m.split(".")[0] in PROJECT)
    report["remote_modules"] = sorted(m for m in sys.modules if m.startswith("transformers_modules."))
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
