"""The one generator: KV-cached decoding equal to a full recompute, batches equal single prompts,
streaming equals batch decoding, bf16 on CPU, and where a model runs by default."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni.config import ConfigError
from omni.model.generate import LocalGenerator, resolve_placement

NEW = 6


def _media():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32)
    return {"image": [image], "audio": [tone]}


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def generator(tiny_model):
    model, tok = tiny_model
    return LocalGenerator(model, tok, batch_size=2)


def test_decoding_feeds_the_prompt_once_then_one_token_per_step(generator):
    """Greedy decoding with the cache == a reference that recomputes the whole sequence every step,
    while the LLM is fed the prompt once and then one position per new token."""
    model = generator.model
    example = generator.prompt(_user("<image> <audio> which note is played?"), _media(), NEW)
    fed = []

    def count(module, args, kwargs, output):
        x = kwargs.get("inputs_embeds")
        fed.append((x if x is not None else kwargs["input_ids"]).shape[1])

    handle = model.llm.register_forward_hook(count, with_kwargs=True)
    try:  # min_new_tokens: NEW steps even where the random model would end at once
        new = generator._generate([example], {**generator._kwargs(NEW, 0.0), "min_new_tokens": NEW})[0]
    finally:
        handle.remove()
    prompt = len(example.input_ids)
    assert fed == [prompt] + [1] * (NEW - 1)

    with torch.no_grad():  # the reference: no cache, the full sequence each step, end tokens masked as above
        embeds = model.embed(example.input_ids[None], example.media)
        reference = []
        for _ in range(NEW):
            logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            logits[generator.eos] = -float("inf")
            token = int(logits.argmax())
            reference.append(token)
            embeds = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    assert new.tolist() == reference


def test_a_batch_decodes_like_its_prompts_one_by_one_and_streams_the_same(generator):
    media = _media()
    examples = [generator.prompt(_user("<image> what colour is the shape?"), {"image": media["image"]}, NEW),
                generator.prompt(_user("<audio> which note is played? answer in one word please"),
                                 {"audio": media["audio"]}, NEW),
                generator.prompt(_user("what is two plus three?"), None, NEW)]
    assert len({len(e.input_ids) for e in examples}) == 3  # left padding is exercised
    batched = generator.generate(examples, NEW)
    alone = [generator.generate([e], NEW)[0] for e in examples]
    assert batched == alone
    assert ["".join(generator.stream(e, NEW)) for e in examples] == alone


def test_bf16_on_cpu_loads_and_decodes(tiny_model, tmp_path):
    model, tok = tiny_model
    model.save_pretrained(tmp_path / "model", tok)
    gen = LocalGenerator.load(tmp_path / "model", device="cpu", dtype="bf16")
    assert gen.device.type == "cpu" and {p.dtype for p in gen.model.llm.parameters()} == {torch.bfloat16}
    seen = []
    handle = gen.model.llm.register_forward_hook(
        lambda m, a, kw, out: seen.append(out.logits.dtype), with_kwargs=True)
    try:
        answer = gen.generate([gen.prompt(_user("<image> <audio> which note?"), _media(), NEW)], NEW)
    finally:
        handle.remove()
    assert isinstance(answer[0], str) and seen and set(seen) == {torch.bfloat16}


def test_default_placement_is_cuda_bf16_only_where_a_gpu_is_visible():
    if torch.cuda.is_available():
        assert resolve_placement()[0].type == "cuda"
    else:
        assert resolve_placement() == (torch.device("cpu"), torch.float32)
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_placement("cuda")
    assert resolve_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="not a device"):
        resolve_placement("gpu0")
