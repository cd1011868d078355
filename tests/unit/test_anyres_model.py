"""AnyRes through the processor and the model: token counts agree for awkward image sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import num_tiles
from omni.model.omni_model import OmniModel
from omni.model.processor import OmniProcessor, collate
from omni.presets import build_preset

SIZES = [(33, 31), (47, 29), (320, 8), (8, 320), (1, 100), (3, 3), (1, 1), (2000, 1500), (64, 32), (32, 96)]


@pytest.fixture(scope="module")
def tiled():
    torch.manual_seed(0)
    model, tok = OmniModel.from_config(build_preset("tiny", ["anyres.max_tiles=4"]))
    model.eval()
    return model, tok, OmniProcessor.from_config(model.config, tok, model.token_ids)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_processor_and_model_agree_on_tiled_image_tokens(tiled, size):
    model, tok, proc = tiled
    chat = [{"role": "user", "content": "<image> what colour is the shape?"}, {"role": "assistant", "content": "red"}]
    ex = proc(chat, {"image": [_image(*size)]})
    tiles = num_tiles(*size, model.encoders["image"].image_size, model.config.anyres)
    assert ex.media.image_tiles == [tiles] and ex.media.image.shape[0] == tiles
    n_pos = int((ex.input_ids == model.token_ids["image"]).sum())
    assert n_pos == tiles * model.image_tokens()
    with torch.no_grad():
        assert model.encode("image", ex.media).shape[0] == n_pos
        model(ex.input_ids[None], media=ex.media)  # the scatter accepts it


def test_tiled_images_of_different_shapes_batch_together(tiled):
    model, tok, proc = tiled
    chat = lambda n: [{"role": "user", "content": "<image> " * n + "describe the image."},  # noqa: E731
                      {"role": "assistant", "content": "a red circle"}]
    a = proc(chat(2), {"image": [_image(320, 8), _image(5, 7)]})
    b = proc(chat(1), {"image": [_image(2000, 1500)]})
    batch = collate([a, b], tok.pad_token_id)
    assert batch.media.image_tiles == a.media.image_tiles + b.media.image_tiles
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.labels, batch.media)
    assert torch.isfinite(out.loss)


def test_wide_images_get_more_tiles_than_one(tiled):
    model, _, _ = tiled
    size = model.encoders["image"].image_size
    assert num_tiles(4 * size, size, size, model.config.anyres) == 1 + 4   # thumbnail + 1x4 grid
    assert num_tiles(size, size, size, model.config.anyres) >= 2
    assert build_preset("7b").anyres.max_tiles == 9
