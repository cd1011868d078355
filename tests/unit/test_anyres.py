"""AnyRes tiling on real PIL images: grid choice, tile count/size/mode, where tile pixels come
from (raster order, centred grey padding, thumbnail), the no-tiling default, config errors."""

import numpy as np
import pytest
from PIL import Image

from encoders import AnyResConfig, anyres_tiles, candidate_grids, num_tiles, select_grid
from encoders.anyres import PAD_COLOR

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

# (tile_size, max_tiles, width, height, expected (rows, cols))
GRID_CASES = [
    # square: as many tiles as fill a square canvas; a tile-sized image stays 1 x 1
    (384, 4, 384, 384, (1, 1)),
    (384, 4, 1000, 1000, (2, 2)),
    (384, 6, 1000, 1000, (2, 2)),
    (384, 9, 1000, 1000, (3, 3)),
    # wide 4:1 / tall 1:4
    (384, 4, 1536, 384, (1, 4)),
    (384, 9, 4000, 1000, (1, 4)),
    (384, 4, 384, 1536, (4, 1)),
    (384, 9, 1000, 4000, (4, 1)),
    # extreme 1:20 / 20:1: a strip as long as max_tiles allows ...
    (384, 4, 100, 2000, (4, 1)),
    (384, 6, 100, 2000, (6, 1)),
    (384, 9, 2000, 100, (1, 6)),  # not 1 x 9: 1 x 6 (2304 px wide) already holds every source pixel
    # ... but upscaling earns nothing, so a small strip gets the smallest canvas it fills
    (384, 9, 20, 400, (2, 1)),
    (384, 9, 400, 20, (1, 2)),
    # very small: 1 x 1
    (384, 4, 5, 7, (1, 1)),
    (384, 9, 5, 7, (1, 1)),
    # very large 4:3 / 3:4
    (384, 4, 4000, 3000, (2, 2)),
    (384, 6, 4000, 3000, (2, 3)),
    (384, 6, 3000, 4000, (3, 2)),
    (384, 9, 4000, 3000, (3, 3)),
    # tiny tower
    (32, 4, 64, 64, (2, 2)),
    (32, 4, 128, 32, (1, 4)),
    (32, 4, 32, 128, (4, 1)),
    (32, 4, 20, 400, (4, 1)),
    (32, 4, 5, 7, (1, 1)),
    (32, 4, 4000, 3000, (2, 2)),
    # degenerate: the short side floors to 0 px on every canvas -> least waste, 1 x 1
    (32, 4, 1, 10000, (1, 1)),
]


def _solid(width: int, height: int, color=WHITE, mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", (width, height), color).convert(mode)


def _halves(width: int, height: int, first, second, vertical_split: bool = True) -> Image.Image:
    """first colour in the left (top) half, second in the right (bottom) half."""
    image = Image.new("RGB", (width, height), first)
    box = (width // 2, 0, width, height) if vertical_split else (0, height // 2, width, height)
    image.paste(second, box)
    return image


def _mean(tile: Image.Image) -> np.ndarray:
    return np.asarray(tile, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def _dominant(tile: Image.Image, colors: dict) -> str:
    mean = _mean(tile)
    return min(colors, key=lambda name: np.abs(mean - np.asarray(colors[name])).sum())


# ---------------------------------------------------------------- grid choice


def test_candidate_grids():
    assert candidate_grids(1) == [(1, 1)]
    assert candidate_grids(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    for max_tiles in (6, 9):
        expected = {(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles}
        grids = candidate_grids(max_tiles)
        assert set(grids) == expected and len(grids) == len(expected)
        assert grids == sorted(grids)  # raster order: ties go to fewer rows
    with pytest.raises(ValueError, match="max_tiles must be an int >= 1"):
        candidate_grids(0)


@pytest.mark.parametrize(("tile_size", "max_tiles", "width", "height", "expected"), GRID_CASES)
def test_select_grid(tile_size, max_tiles, width, height, expected):
    assert select_grid(width, height, tile_size, max_tiles) == expected
    # transposing the image transposes the grid (no orientation bias; catches (h, w) order slips)
    assert select_grid(height, width, tile_size, max_tiles) == expected[::-1]


def test_select_grid_never_exceeds_max_tiles():
    for width, height in [(4000, 3000), (10000, 10000), (50, 5000), (384 * 7, 384)]:
        for max_tiles in range(1, 13):
            rows, cols = select_grid(width, height, 384, max_tiles)
            assert 1 <= rows * cols <= max_tiles


# ---------------------------------------------------------------- tiles


@pytest.mark.parametrize("thumbnail", [True, False])
@pytest.mark.parametrize(("tile_size", "max_tiles", "width", "height", "expected"), GRID_CASES)
def test_tiles_shape_and_count(tile_size, max_tiles, width, height, expected, thumbnail):
    cfg = AnyResConfig(max_tiles=max_tiles, thumbnail=thumbnail)
    tiles, grid = anyres_tiles(_solid(width, height), tile_size, cfg)
    assert grid == expected
    assert len(tiles) == num_tiles(width, height, tile_size, cfg) == expected[0] * expected[1] + thumbnail
    assert all(t.size == (tile_size, tile_size) and t.mode == "RGB" for t in tiles)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_non_rgb_inputs_become_rgb(mode):
    tiles, _ = anyres_tiles(_solid(100, 60, GREEN, mode), 32, AnyResConfig(max_tiles=4))
    assert all(t.mode == "RGB" and t.size == (32, 32) for t in tiles)


def test_wide_image_left_red_right_blue():
    colors = {"red": RED, "blue": BLUE}
    tiles, grid = anyres_tiles(_halves(1536, 384, RED, BLUE), 384, AnyResConfig(max_tiles=4))
    assert grid == (1, 4)
    thumb, *row = tiles
    assert [_dominant(t, colors) for t in row] == ["red", "red", "blue", "blue"]
    # the thumbnail is the whole image: left half red, right half blue
    assert _dominant(thumb.crop((0, 0, 190, 384)), colors) == "red"
    assert _dominant(thumb.crop((194, 0, 384, 384)), colors) == "blue"


def test_tall_extreme_image_top_red_bottom_blue():
    colors = {"red": RED, "blue": BLUE}
    cfg = AnyResConfig(max_tiles=6, thumbnail=False)
    tiles, grid = anyres_tiles(_halves(100, 2000, RED, BLUE, vertical_split=False), 384, cfg)
    assert grid == (6, 1)
    assert [_dominant(t, colors) for t in tiles] == ["red"] * 3 + ["blue"] * 3


def test_quadrants_come_out_in_raster_order():
    image = Image.new("RGB", (800, 800), RED)
    image.paste(GREEN, (400, 0, 800, 400))
    image.paste(BLUE, (0, 400, 400, 800))
    image.paste(WHITE, (400, 400, 800, 800))
    colors = {"red": RED, "green": GREEN, "blue": BLUE, "white": WHITE}
    for tile_size in (384, 32):
        tiles, grid = anyres_tiles(image, tile_size, AnyResConfig(max_tiles=4, thumbnail=False))
        assert grid == (2, 2)
        assert [_dominant(t, colors) for t in tiles] == ["red", "green", "blue", "white"]


def test_padding_is_centred_grey():
    # 1000 x 400 -> 1 x 3 canvas of 1152 x 384; the image fits as 960 x 384, 96 px of grey each side
    tiles, grid = anyres_tiles(_solid(1000, 400, WHITE), 384, AnyResConfig(max_tiles=4, thumbnail=False))
    assert grid == (1, 3)
    left, middle, right = (np.asarray(t) for t in tiles)
    assert (left[:, :96] == PAD_COLOR).all() and (left[:, 96:] == WHITE).all()
    assert (middle == WHITE).all()
    assert (right[:, : 384 - 96] == WHITE).all() and (right[:, 384 - 96 :] == PAD_COLOR).all()


def test_small_image_is_upscaled_into_one_tile():
    tiles, grid = anyres_tiles(_solid(5, 7, BLUE), 384, AnyResConfig(max_tiles=9, thumbnail=False))
    assert grid == (1, 1) and len(tiles) == 1
    # 5 x 7 fits as 275 x 384 (ceil), centred: 54 px of grey left, 55 right
    pixels = np.asarray(tiles[0])
    assert (pixels[:, :54] == PAD_COLOR).all() and (pixels[:, 54 : 54 + 275] == BLUE).all()
    assert (pixels[:, 54 + 275 :] == PAD_COLOR).all()


# ---------------------------------------------------------------- no tiling, one tile, config


@pytest.mark.parametrize("thumbnail", [True, False])
def test_max_tiles_zero_is_one_whole_image_tile(thumbnail):
    image = _halves(4000, 1000, RED, BLUE)
    cfg = AnyResConfig(max_tiles=0, thumbnail=thumbnail)
    tiles, grid = anyres_tiles(image, 384, cfg)
    assert grid == (1, 1) and len(tiles) == 1 == num_tiles(4000, 1000, 384, cfg)
    # squashed, not padded: exactly today's resize-to-one-tile
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(image.resize((384, 384), Image.Resampling.BICUBIC)))
    assert AnyResConfig().max_tiles == 0  # the default keeps the pre-AnyRes behaviour


def test_max_tiles_one():
    image = _solid(1000, 500, GREEN)
    with_thumb, grid = anyres_tiles(image, 384, AnyResConfig(max_tiles=1))
    assert grid == (1, 1) and len(with_thumb) == 2 == num_tiles(1000, 500, 384, AnyResConfig(max_tiles=1))
    assert (np.asarray(with_thumb[0]) == GREEN).all()  # thumbnail: squashed, no padding
    assert (np.asarray(with_thumb[1])[:50] == PAD_COLOR).all()  # tile: aspect kept, grey bands
    without, _ = anyres_tiles(image, 384, AnyResConfig(max_tiles=1, thumbnail=False))
    assert len(without) == 1 and np.array_equal(np.asarray(without[0]), np.asarray(with_thumb[1]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", None])
def test_invalid_max_tiles(bad):
    with pytest.raises(ValueError, match=r"AnyResConfig: max_tiles must be an int >= 0"):
        AnyResConfig(max_tiles=bad)


def test_invalid_thumbnail_tile_size_and_image():
    with pytest.raises(ValueError, match="AnyResConfig: thumbnail must be true or false"):
        AnyResConfig(max_tiles=4, thumbnail="yes")
    cfg = AnyResConfig(max_tiles=4)
    for bad in (0, -384, 38.4):
        with pytest.raises(ValueError, match="tile_size must be a positive int"):
            anyres_tiles(_solid(10, 10), bad, cfg)
        with pytest.raises(ValueError, match="tile_size must be a positive int"):
            num_tiles(10, 10, bad, cfg)
    with pytest.raises(ValueError, match=r"image size must be at least 1 x 1 px, got 0 x 10"):
        anyres_tiles(Image.new("RGB", (0, 10)), 384, cfg)
    with pytest.raises(ValueError, match=r"image size must be at least 1 x 1 px"):
        num_tiles(10, 0, 384, cfg)
