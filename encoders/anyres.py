"""AnyRes image tiling (LLaVA-NeXT / LLaVA-OneVision "anyres") for a fixed-size image tower.

The tower sees square ``tile_size`` images (384 px for SigLIP-so400m-patch14-384). A large or
elongated image is cut into a grid of such tiles so its detail survives, optionally preceded by
a global thumbnail. Every returned tile is a ``tile_size`` x ``tile_size`` RGB PIL image, so each
costs the same number of LLM tokens (the projector's per-tile count); an image costs
``num_tiles(...)`` times that, and ``num_tiles`` needs only the image size, not its pixels.

Choices, in order:
  * Candidate grids: every (rows, cols) with rows * cols <= ``max_tiles``, in raster order
    (rows ascending, then cols ascending); the canvas of a grid is
    (rows * tile_size) x (cols * tile_size) pixels (height x width).
  * Grid rule: ``transformers.image_processing_utils.select_best_resolution`` over those
    canvases: maximise the effective resolution min(w * h, w' * h'), where w' x h' is the image
    scaled (up or down) to fit the canvas keeping its aspect ratio, floored to whole pixels;
    on ties minimise the wasted canvas area; on a full tie the first candidate in raster order
    wins (fewer rows). The cap at w * h means upscaling earns nothing: a small image gets the
    smallest canvas it fills at its own resolution (5 x 7 px -> 1 x 1; 20 x 400 px at 384 ->
    2 x 1, not 6 x 1). An image so thin that its short side floors to 0 px on every canvas
    (e.g. 1 x 10000 px) has effective area 0 everywhere and so gets the least-waste canvas, 1 x 1.
  * Resize: the image is scaled to fit the canvas keeping its aspect ratio (bicubic); the
    limiting side fills the canvas exactly, the other side is ceil(side * scale), capped at the
    canvas -- the arithmetic of ``transformers.image_processing_utils.get_patch_output_size``.
  * Pad: centred (left/top get the floor of half the slack) with ``PAD_COLOR`` = mean grey
    (127, 127, 127). SigLIP normalises with mean = std = 0.5, so grey pads become ~0 after
    normalisation (no signal), as in LLaVA-1.5's "pad" mode; LLaVA-NeXT pads with black.
  * Tiles: the padded canvas is cut into rows x cols tiles, returned in raster order
    (row 0 left to right, then row 1, ...).
  * Thumbnail (``thumbnail=True``, ``max_tiles >= 1``): the whole image squashed to
    tile_size x tile_size (aspect ratio not kept, like the no-tiling path), placed first.
  * ``max_tiles=0``: no tiling -- one tile, the whole image squashed to tile_size x tile_size,
    grid (1, 1), no thumbnail (``thumbnail`` is ignored). This is the pre-AnyRes behaviour.
  * ``max_tiles=1`` with a thumbnail gives 2 tiles (thumbnail + a 1 x 1 aspect-preserving,
    padded tile); without a thumbnail it gives the padded tile alone.
Non-RGB inputs (L, P, RGBA, I;16, ...) are converted with ``Image.convert("RGB")``, which drops
alpha. EXIF orientation is not applied here; do it when decoding if you need it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from PIL import Image
from transformers.image_processing_utils import select_best_resolution

PAD_COLOR = (127, 127, 127)  # mean grey; ~0 after SigLIP's (x - 0.5) / 0.5 normalisation
RESAMPLE = Image.Resampling.BICUBIC  # SigLIP's open_clip preprocess interpolation


@dataclass
class AnyResConfig:
    max_tiles: int = 0  # 0 = no tiling: the whole image is resized to one tile (pre-AnyRes behaviour)
    thumbnail: bool = True  # add a global thumbnail (whole image resized to one tile) before the tiles

    def __post_init__(self) -> None:
        if isinstance(self.max_tiles, bool) or not isinstance(self.max_tiles, numbers.Integral) or self.max_tiles < 0:
            raise ValueError(
                f"AnyResConfig: max_tiles must be an int >= 0 (0 = no tiling, one whole-image tile; "
                f"N >= 1 = up to N tiles plus the thumbnail), got {self.max_tiles!r}"
            )
        if not isinstance(self.thumbnail, bool):
            raise ValueError(f"AnyResConfig: thumbnail must be true or false, got {self.thumbnail!r}")


def _check_tile_size(tile_size: int) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral) or tile_size < 1:
        raise ValueError(f"anyres: tile_size must be a positive int (the tower's image size), got {tile_size!r}")


def _check_image_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"anyres: image size must be at least 1 x 1 px, got {width} x {height}")


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """All (rows, cols) with rows, cols >= 1 and rows * cols <= max_tiles, in raster order."""
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, numbers.Integral) or max_tiles < 1:
        raise ValueError(f"candidate_grids: max_tiles must be an int >= 1, got {max_tiles!r}")
    return [(rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles // rows + 1)]


def select_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the best canvas for a width x height image; see the module docstring."""
    _check_tile_size(tile_size)
    _check_image_size(width, height)
    grids = candidate_grids(max_tiles)
    canvases = [(rows * tile_size, cols * tile_size) for rows, cols in grids]  # (height, width), HF's order
    best_h, best_w = select_best_resolution((height, width), canvases)
    return best_h // tile_size, best_w // tile_size


def num_tiles(width: int, height: int, tile_size: int, cfg: AnyResConfig) -> int:
    """len(anyres_tiles(image, tile_size, cfg)[0]) for a width x height image, without its pixels."""
    _check_tile_size(tile_size)
    _check_image_size(width, height)
    if cfg.max_tiles == 0:
        return 1
    rows, cols = select_grid(width, height, tile_size, cfg.max_tiles)
    return rows * cols + int(cfg.thumbnail)


def _fit_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    """Aspect-preserving (width, height) inside the canvas (get_patch_output_size's arithmetic)."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return canvas_w, min(math.ceil(height * scale_w), canvas_h)
    return min(math.ceil(width * scale_h), canvas_w), canvas_h


def anyres_tiles(
    image: Image.Image, tile_size: int, cfg: AnyResConfig
) -> tuple[list[Image.Image], tuple[int, int]]:
    """([thumbnail?, tile_0, tile_1, ...], (rows, cols)); tiles tile_size x tile_size RGB, raster order."""
    _check_tile_size(tile_size)
    width, height = image.size
    _check_image_size(width, height)
    image = image.convert("RGB")
    whole = image.resize((tile_size, tile_size), RESAMPLE)
    if cfg.max_tiles == 0:
        return [whole], (1, 1)

    rows, cols = select_grid(width, height, tile_size, cfg.max_tiles)
    canvas_w, canvas_h = cols * tile_size, rows * tile_size
    fit_w, fit_h = _fit_size(width, height, canvas_w, canvas_h)
    canvas = Image.new("RGB", (canvas_w, canvas_h), PAD_COLOR)
    canvas.paste(image.resize((fit_w, fit_h), RESAMPLE), ((canvas_w - fit_w) // 2, (canvas_h - fit_h) // 2))
    tiles = [
        canvas.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    return ([whole] if cfg.thumbnail else []) + tiles, (rows, cols)
