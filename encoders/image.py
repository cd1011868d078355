"""Image tower: an open_clip vision trunk that returns its patch tokens.

The LLM consumes per-patch tokens, so the tower's pooling head (class token, SigLIP's MAP
head, contrastive projection) is removed at build time: nothing unused is left to train or
to trip DDP's unused-parameter check. Video frames go through the same tower.

What ``forward`` returns, [N, grid_size**2, out_dim], row-major over the patch grid:
  * open_clip ``VisionTransformer`` (``vision_cfg`` dicts, and named models such as
    "ViT-B-16"): open_clip's own ``output_tokens`` path, i.e. ``ln_post`` applied to the last
    block's output, class token removed.
  * timm trunks (named models such as "ViT-SO400M-14-SigLIP-384"):
    ``trunk.forward_features(x)`` (which ends with the trunk's final norm for SigLIP) with the
    trunk's prefix tokens (class/register tokens, none for SigLIP) removed.
  * ``feature_layer=k`` (an int; default None = the two rules above): the raw output of
    transformer block k instead (0-based, Python-style negative indices: -1 = last block,
    -2 = penultimate), without the final norm, prefix tokens removed. This is the LLaVA
    convention (``vision_feature_layer`` over CLIP's hidden states, which skip
    ``post_layernorm``). Both tower kinds read it through open_clip's own
    ``forward_intermediates``; the blocks after k and the final norm are pruned at build time
    (open_clip's / timm's ``prune_intermediate_layers``), since nothing would use them.
    Note HF's index counts the embeddings as hidden state 0, so HF ``vision_feature_layer``
    k >= 1 is our k - 1; negative indices agree.
Parameters follow open_clip's names under ``visual.``, so open_clip checkpoints map onto them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.pretrained import get_pretrained_cfg, is_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

_VISION_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(CLIPVisionCfg))
_PREPROCESS_FIELDS = ("mean", "std", "interpolation", "resize_mode")


@dataclass
class ImageTowerConfig:
    """Exactly one of ``open_clip_model`` (full preset) or ``vision_cfg`` (tiny preset)."""

    open_clip_model: str | None = None  # open_clip registry name, e.g. "ViT-SO400M-14-SigLIP-384"
    pretrained: str | None = None  # open_clip pretrained tag ("webli") or local weights file; None = random init
    vision_cfg: dict | None = None  # open_clip CLIPVisionCfg fields, e.g. {"image_size": 32, "patch_size": 4, ...}
    feature_layer: int | None = None  # None: final-normalised tokens; k: raw output of block k (-2 = LLaVA-1.5)

    def __post_init__(self) -> None:
        if self.feature_layer is not None and (
            isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int)
        ):
            raise ValueError(
                "ImageTowerConfig: feature_layer must be an int block index (e.g. -2) or None, "
                f"got {self.feature_layer!r}"
            )
        if (self.open_clip_model is None) == (self.vision_cfg is None):
            raise ValueError(
                "ImageTowerConfig: set exactly one of open_clip_model (a name from open_clip.list_models()) "
                "or vision_cfg (a dict of open_clip CLIPVisionCfg fields); "
                f"got open_clip_model={self.open_clip_model!r}, vision_cfg={self.vision_cfg!r}"
            )
        if self.open_clip_model is not None and self.open_clip_model not in open_clip.list_models():
            raise ValueError(
                f"ImageTowerConfig: open_clip_model {self.open_clip_model!r} is not in open_clip's registry "
                "(see open_clip.list_models(); register a custom JSON with open_clip.add_model_config)"
            )
        if self.vision_cfg is not None:
            if self.pretrained is not None:
                raise ValueError(
                    "ImageTowerConfig: pretrained only applies to open_clip_model; a vision_cfg tower is random-init"
                )
            if not isinstance(self.vision_cfg, dict):
                raise ValueError(f"ImageTowerConfig: vision_cfg must be a dict, got {type(self.vision_cfg).__name__}")
            unknown = sorted(set(self.vision_cfg) - _VISION_CFG_FIELDS)
            if unknown:
                raise ValueError(
                    f"ImageTowerConfig: vision_cfg has unknown keys {unknown}; valid keys are CLIPVisionCfg fields: "
                    f"{sorted(_VISION_CFG_FIELDS)}"
                )


def _registered_preprocess(name: str) -> dict:
    """Preprocessing shared by all of ``name``'s registered pretrained tags ({} if they disagree).

    open_clip only applies a tag's mean/std/resize mode when weights come from that tag; a
    random-init or local-file SigLIP would silently get OpenAI's CLIP normalisation instead.
    """
    tags = list_pretrained_tags_by_model(name)
    cfgs = [{k: get_pretrained_cfg(name, tag).get(k) for k in _PREPROCESS_FIELDS} for tag in tags]
    if not cfgs or any(c != cfgs[0] for c in cfgs):
        return {}
    return {k: v for k, v in cfgs[0].items() if v is not None}


def _build_visual(cfg: ImageTowerConfig) -> tuple[nn.Module, dict]:
    """Returns the open_clip visual module and its preprocess cfg dict (PreprocessCfg fields)."""
    device = torch.get_default_device()  # honours `with torch.device("meta"):`
    if cfg.vision_cfg is not None:
        vision_cfg = {**cfg.vision_cfg, "output_tokens": True, "timm_model_pretrained": False}
        width = vision_cfg.get("width", CLIPVisionCfg.width)
        visual = _build_vision_tower(embed_dim=width, vision_cfg=vision_cfg)
        return visual, merge_preprocess_dict(PreprocessCfg(), {})

    name = cfg.open_clip_model
    overlay = {} if cfg.pretrained and is_pretrained_cfg(name, cfg.pretrained) else _registered_preprocess(name)
    if cfg.pretrained is None:
        # Random init: build the vision tower alone (create_model would also build the text tower).
        model_cfg = open_clip.get_model_config(name)
        vision_cfg = {**model_cfg["vision_cfg"], "timm_model_pretrained": False}
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False))
        return visual, merge_preprocess_dict(PreprocessCfg(), overlay)

    if device.type == "meta":
        raise ValueError(
            f"ImageEncoder: cannot load pretrained={cfg.pretrained!r} on the meta device; build on a real device "
            "(or build with pretrained=None on meta and load weights after materialising)"
        )
    # Weights: open_clip's factory resolves the tag/file and loads the full CLIP state dict; keep .visual.
    model = open_clip.create_model(
        name,
        pretrained=cfg.pretrained,
        device=device,
        pretrained_text=False,
        require_pretrained=True,
        force_preprocess_cfg=overlay,
    )
    visual = model.visual
    del model  # drops the text tower
    return visual, dict(visual.preprocess_cfg)


def _square(value, what: str, source: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"ImageEncoder: {source} has a non-square {what} {value}; only square inputs are supported")
    return int(a)


class ImageEncoder(nn.Module):
    """open_clip vision tower returning patch tokens [N, num_patches, out_dim]."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        source = cfg.open_clip_model or "vision_cfg"
        visual, preprocess_cfg = _build_visual(cfg)
        if isinstance(visual, TimmModel):
            trunk = visual.trunk
            if not (hasattr(trunk, "num_prefix_tokens") and hasattr(trunk, "patch_embed")):
                raise ValueError(
                    f"ImageEncoder: {source}'s timm trunk {type(trunk).__name__} is not a ViT with patch tokens"
                )
            if getattr(trunk, "patch_drop", None) is not None and not isinstance(trunk.patch_drop, nn.Identity):
                raise ValueError(f"ImageEncoder: {source} uses patch dropout, which changes the token count")
            trunk.reset_classifier(0, global_pool="")  # removes the MAP/attention head and classifier
            visual.head = nn.Sequential()  # open_clip's projection head, unused for patch tokens
            if tuple(trunk.patch_embed.img_size) != tuple(visual.image_size):
                raise ValueError(
                    f"ImageEncoder: {source} declares image_size {visual.image_size} but its timm trunk "
                    f"expects {tuple(trunk.patch_embed.img_size)}; make the config's image_size match the trunk"
                )
            self._num_prefix_tokens = int(trunk.num_prefix_tokens)
            self.out_dim = int(trunk.num_features)
            grid, size = trunk.patch_embed.grid_size, visual.image_size
        elif isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg") or visual.final_ln_after_pool:
                raise ValueError(
                    f"ImageEncoder: {source} needs pool_type 'tok' or 'avg', no attentional_pool and "
                    "final_ln_after_pool=False so its tokens are the normalised patch tokens"
                )
            if not isinstance(visual.patch_dropout, nn.Identity):
                raise ValueError(f"ImageEncoder: {source} uses patch_dropout, which changes the token count")
            visual.output_tokens = True
            visual.proj = None  # contrastive projection, unused for patch tokens
            self._num_prefix_tokens = 0  # open_clip strips the class token itself
            self.out_dim = int(visual.conv1.out_channels)
            grid, size = visual.grid_size, visual.image_size
        else:
            raise ValueError(
                f"ImageEncoder: {source} builds a {type(visual).__name__}; only ViT towers "
                "(open_clip VisionTransformer or timm ViT) have patch tokens"
            )
        self.visual = visual
        self._feature_block = None if cfg.feature_layer is None else self._prune_after(cfg.feature_layer, source)
        self.image_size = _square(size, "image size", source)
        self.grid_size = _square(grid, "patch grid", source)
        self.num_patches = self.grid_size**2
        self.preprocess_cfg = {**preprocess_cfg, "size": self.image_size}
        self._transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """open_clip's eval transform (resize/crop, RGB, normalise) -> float32 [N, 3, S, S] on CPU."""
        if not images:
            raise ValueError("ImageEncoder.preprocess: got an empty image list")
        return torch.stack([self._transform(image) for image in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"ImageEncoder: expected pixels [N, {shape}], got {tuple(pixels.shape)}")
        pixels = pixels.to(next(self.parameters()).dtype)
        if self._feature_block is not None:
            # open_clip's intermediates API (TimmModel delegates to timm's): block output, prefix tokens split off
            out = self.visual.forward_intermediates(
                pixels,
                indices=[self._feature_block],
                normalize_intermediates=False,
                intermediates_only=True,
                output_fmt="NLC",
            )
            return out["image_intermediates"][0]
        if isinstance(self.visual, TimmModel):
            tokens = self.visual.trunk.forward_features(pixels)[:, self._num_prefix_tokens :]
        else:
            _, tokens = self.visual(pixels)
        return tokens

    def _prune_after(self, feature_layer: int, source: str) -> int:
        """Drop the blocks after ``feature_layer`` and the final norm; returns the absolute block index."""
        timm_tower = isinstance(self.visual, TimmModel)
        blocks = len(self.visual.trunk.blocks) if timm_tower else len(self.visual.transformer.resblocks)
        if not -blocks <= feature_layer < blocks:
            raise ValueError(
                f"ImageEncoder: feature_layer {feature_layer} is out of range for {source}, which has {blocks} "
                f"blocks; use {-blocks}..{blocks - 1} (-1 = last block, -2 = penultimate)"
            )
        if timm_tower:
            (index,) = self.visual.trunk.prune_intermediate_layers([feature_layer], prune_norm=True, prune_head=True)
        else:
            (index,) = self.visual.prune_intermediate_layers([feature_layer], prune_norm=True, prune_head=True)
        return int(index)
