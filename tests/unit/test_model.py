"""OmniModel + processor contracts at tiny size: token counts, labels, fusion, training signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE, PlaceholderMismatchError
from omni.model.processor import OmniProcessor, collate
from omni.train.optim import OptimConfig, build_optimizer, set_trainable

RED, GREEN = (220, 30, 30), (30, 200, 30)


def _img(colour, size=32):
    return Image.new("RGB", (size, size), colour)


def _chat(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def model_and_processor(tiny_model):
    model, tok = tiny_model
    return model, tok, OmniProcessor.from_config(model.config, tok, model.token_ids)


def test_processor_expands_each_placeholder_to_the_projector_token_count(model_and_processor):
    model, tok, proc = model_and_processor
    wav = np.random.default_rng(0).standard_normal(9_000).astype(np.float32) * 0.1  # 0.5625 s
    frames = [_img(RED)] * 3
    ex = proc(_chat("<image> <image> <video> <audio> what colour is the shape?", "red"),
              {"image": [_img(RED), _img(GREEN)], "video": [frames], "audio": [wav]})
    ids = ex.input_ids
    img_id, vid_id, aud_id = (model.token_ids[m] for m in ("image", "video", "audio"))
    per_image = model.projectors["image"].num_tokens(model.encoders["image"].num_patches)
    assert per_image == 16  # 8x8 patch grid pooled 2x2
    assert int((ids == img_id).sum()) == 2 * per_image
    assert int((ids == vid_id).sum()) == 3 * model.projectors["video"].num_tokens(64)
    valid = ex.media.audio_valid
    assert valid == [int(np.ceil(9_000 / 320))]  # 50 encoder frames per second of real audio
    assert int((ids == aud_id).sum()) == int(np.ceil(valid[0] / 4))  # Conv-GMLP stride 4
    # the model produces exactly those features, in order
    for modality, tid in (("image", img_id), ("video", vid_id), ("audio", aud_id)):
        assert model.encode(modality, ex.media).shape == (int((ids == tid).sum()), model.llm.config.hidden_size)


def test_long_audio_is_split_into_encoder_windows(model_and_processor):
    model, _, proc = model_and_processor
    window = model.encoders["audio"].window_samples
    wav = (0.1 * np.random.default_rng(0).standard_normal(int(window * 2.5))).astype(np.float32)
    ex = proc(_chat("<audio> transcribe the audio.", "a do tone"), {"audio": [wav]})
    assert ex.media.audio.shape[0] == 3 and ex.notes == []  # within the tiny preset's 4 windows
    assert ex.media.audio_valid[:2] == [model.encoders["audio"].valid_frames(window)] * 2
    assert int((ex.input_ids == model.token_ids["audio"]).sum()) == model.encode("audio", ex.media).shape[0]


def test_labels_cover_only_the_assistant_reply(model_and_processor):
    model, tok, proc = model_and_processor
    ex = proc(_chat("<image> what colour is the shape?", "red"), {"image": [_img(RED)]})
    target = ex.input_ids[ex.labels != IGNORE]
    assert tok.convert_ids_to_tokens(target.tolist()) == ["red", tok.eos_token]
    media_pos = ex.input_ids == model.token_ids["image"]
    assert (ex.labels[media_pos] == IGNORE).all()


def test_placeholder_media_count_mismatch_is_a_clear_error(model_and_processor):
    _, _, proc = model_and_processor
    with pytest.raises(ValueError, match="image: 2 '<image>' placeholder"):
        proc(_chat("<image> <image> what colour?", "red"), {"image": [_img(RED)]})


def test_model_rejects_features_that_do_not_fill_the_placeholders(model_and_processor):
    model, tok, proc = model_and_processor
    ex = proc(_chat("<image> what colour is the shape?", "red"), {"image": [_img(RED)]})
    two = MediaBatch(image=torch.cat([ex.media.image, ex.media.image]))
    with pytest.raises(PlaceholderMismatchError, match="image: 16 placeholder positions.*32 feature"):
        model(ex.input_ids[None], media=two)


def test_batched_forward_equals_per_sample_forward(model_and_processor):
    """Right padding and row-major feature order keep samples independent inside a batch."""
    model, tok, proc = model_and_processor
    model.eval()
    a = proc(_chat("<image> what colour is the shape?", "red"), {"image": [_img(RED)]})
    wav = np.sin(np.linspace(0, 2000, 12_000)).astype(np.float32)
    b = proc(_chat("<audio> <image> which note is played?", "do"), {"audio": [wav], "image": [_img(GREEN)]})
    batch = collate([a, b], tok.pad_token_id)
    with torch.no_grad():
        joint = model(batch.input_ids, batch.attention_mask, media=batch.media).logits
        for i, ex in enumerate((a, b)):
            alone = model(ex.input_ids[None], media=ex.media).logits[0]
            torch.testing.assert_close(joint[i, : len(ex.input_ids)], alone, atol=1e-5, rtol=1e-4)


def test_frozen_parts_stay_bit_identical_and_trainable_parts_learn(tiny_model):
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    torch.manual_seed(0)
    model, tok = OmniModel.from_config(build_preset("tiny"))
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    trainable = set_trainable(model, ["projectors.image.*", "llm.lm_head.*"])
    assert trainable and all(n.startswith(("projectors.image.", "llm.lm_head.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable)
    colours = {"red": RED, "green": GREEN}
    examples = [proc(_chat("<image> what colour is the shape?", c), {"image": [_img(rgb)]})
                for c, rgb in colours.items()] * 4
    batch = collate(examples, tok.pad_token_id)
    losses = []
    for _ in range(25):
        loss = model(batch.input_ids, batch.attention_mask, batch.labels, batch.media).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_unmatched_trainable_glob_is_an_error(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="projector.vision"):
        set_trainable(model, ["projector.vision.*"])
    set_trainable(model, ["*"])


def test_save_and_load_roundtrip(tmp_path, model_and_processor):
    from omni.model.load import load_model

    model, tok, proc = model_and_processor
    model.eval()
    model.save_pretrained(tmp_path / "m", tok)
    loaded, tok2 = load_model(tmp_path / "m")
    loaded.eval()
    ex = proc(_chat("<image> what colour is the shape?", "red"), {"image": [_img(RED)]})
    with torch.no_grad():
        torch.testing.assert_close(model(ex.input_ids[None], media=ex.media).logits,
                                   loaded(ex.input_ids[None], media=ex.media).logits, rtol=0, atol=0)
    assert tok2.get_vocab() == tok.get_vocab()


def test_activation_checkpointing_gives_the_same_gradients():
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    grads, audio_attention_calls = [], []
    wav = np.sin(np.linspace(0, 2000, 12_000)).astype(np.float32)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tok = OmniModel.from_config(build_preset("tiny"))
        model.train()
        if checkpointing:
            model.enable_activation_checkpointing()
        calls = []  # whisper's attention runs again in backward when its blocks are checkpointed
        model.encoders["audio"].encoder.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
        batch = collate([proc(_chat("<image> what colour is the shape?", "red"), {"image": [_img(RED)]}),
                         proc(_chat("<audio> <image> which note?", "do"), {"audio": [wav], "image": [_img(GREEN)]})],
                        tok.pad_token_id)
        model(batch.input_ids, batch.attention_mask, batch.labels, batch.media).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        audio_attention_calls.append(len(calls))
    assert audio_attention_calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    assert any(k.startswith("encoders.image") for k in grads[0]) and any(k.startswith("encoders.audio") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)
