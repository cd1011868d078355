"""transformers' LLaVA (CLIP tower -> 2-layer MLP -> causal LM) as an omni image path.

With the settings below, an ``OmniModel`` computes the same logits as
``transformers.LlavaForConditionalGeneration`` on the same text + image input
(tests/parity/test_llava.py measures it):

- image tower: ``omni_image_config_from_llava`` turns LLaVA's ``CLIPVisionConfig`` into an
  open_clip ``VisionTransformer`` of the same sizes with ``feature_layer`` set from LLaVA's
  ``vision_feature_layer`` (raw block output, no final norm; class token dropped, i.e. LLaVA's
  ``vision_feature_select_strategy="default"``);
- image projector: ``{"kind": "mlp", "options": {"pool": False}}`` (LLaVA's projector);
- LLM: the same transformers class and config as LLaVA's ``text_config``;
- the image placeholder id equal to LLaVA's ``image_token_id``, expanded to
  ``grid_size**2`` tokens per image (LLaVA's processor does the same).

Key mapping, LLaVA (``LlavaForConditionalGeneration.state_dict()`` in transformers 5.x;
on-disk checkpoints with the older ``language_model.model.*`` / ``vision_tower.vision_model.*``
names are renamed by ``from_pretrained``, so load them with it first) -> ``OmniModel``
(``V = model.vision_tower.``, ``O = encoders.image.visual.``, ``i`` = layer index):

| LLaVA                                                  | OmniModel                                          |
|--------------------------------------------------------|----------------------------------------------------|
| V embeddings.class_embedding                           | O class_embedding                                  |
| V embeddings.patch_embedding.weight                    | O conv1.weight                                     |
| V embeddings.position_embedding.weight                 | O positional_embedding                             |
| V pre_layrnorm.{weight,bias}                           | O ln_pre.{weight,bias}                             |
| V encoder.layers.i.layer_norm1.*                       | O transformer.resblocks.i.ln_1.*                   |
| V encoder.layers.i.self_attn.{q,k,v}_proj.weight       | O transformer.resblocks.i.attn.in_proj_weight      |
|                                                        |   (rows: q, then k, then v - concatenated)         |
| V encoder.layers.i.self_attn.{q,k,v}_proj.bias         | O transformer.resblocks.i.attn.in_proj_bias (same) |
| V encoder.layers.i.self_attn.out_proj.*                | O transformer.resblocks.i.attn.out_proj.*          |
| V encoder.layers.i.layer_norm2.*                       | O transformer.resblocks.i.ln_2.*                   |
| V encoder.layers.i.mlp.fc1.*                           | O transformer.resblocks.i.mlp.c_fc.*               |
| V encoder.layers.i.mlp.fc2.*                           | O transformer.resblocks.i.mlp.c_proj.*             |
| V post_layernorm.*                                     | O ln_post.*                                        |
| model.multi_modal_projector.linear_{1,2}.*             | projectors.image.linear_{1,2}.*                    |
| model.language_model.*                                 | llm.model.*                                        |
| lm_head.weight                                         | llm.lm_head.weight                                 |

LLaVA keeps every CLIP layer and ``post_layernorm`` although its features skip them; omni's
tower prunes the blocks after ``feature_layer`` and the final norm at build time, so
``load_llava_weights`` drops exactly those keys (and returns their names). Everything else is
strict: an unknown LLaVA key, a missing omni key of the image path or a shape mismatch raises.
The video and audio parts of the OmniModel are not touched.
"""

from __future__ import annotations

import re

import open_clip
import torch
from open_clip.model import CLIPVisionCfg
from torch import nn

from encoders import ImageTowerConfig

_V = "model.vision_tower."
_O = "encoders.image.visual."

# LLaVA key regex -> omni key template (\1, \2 = captured groups); q/k/v are handled separately.
_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^{re.escape(_V)}embeddings\.class_embedding$"), _O + "class_embedding"),
    (re.compile(rf"^{re.escape(_V)}embeddings\.patch_embedding\.weight$"), _O + "conv1.weight"),
    (re.compile(rf"^{re.escape(_V)}embeddings\.position_embedding\.weight$"), _O + "positional_embedding"),
    (re.compile(rf"^{re.escape(_V)}pre_layrnorm\.(weight|bias)$"), _O + r"ln_pre.\1"),
    (re.compile(rf"^{re.escape(_V)}post_layernorm\.(weight|bias)$"), _O + r"ln_post.\1"),
    (re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$"),
     _O + r"transformer.resblocks.\1.ln_1.\2"),
    (re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$"),
     _O + r"transformer.resblocks.\1.ln_2.\2"),
    (re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$"),
     _O + r"transformer.resblocks.\1.attn.out_proj.\2"),
    (re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$"),
     _O + r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$"),
     _O + r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (re.compile(r"^model\.multi_modal_projector\.(linear_[12]\.(?:weight|bias))$"), r"projectors.image.\1"),
    (re.compile(r"^model\.language_model\.(.+)$"), r"llm.model.\1"),
    (re.compile(r"^lm_head\.weight$"), "llm.lm_head.weight"),
]
_QKV = re.compile(rf"^{re.escape(_V)}encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_PRUNABLE = re.compile(rf"^{re.escape(_O)}(?:transformer\.resblocks\.(\d+)\.|ln_post\.)")


def llava_to_omni_state_dict(llava_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) every key of a LLaVA state dict to OmniModel names (see the table)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in llava_state_dict.items():
        m = _QKV.match(key)
        if m:
            layer, which, kind = m.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, template in _RENAMES:
            if pattern.match(key):
                out[pattern.sub(template, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"llava_to_omni_state_dict: no mapping for {len(unknown)} LLaVA key(s), e.g. {unknown[:5]}; "
            "expected a transformers 5.x LlavaForConditionalGeneration state dict with a CLIP vision tower"
        )
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"llava_to_omni_state_dict: layer {layer} {kind}: q/k/v incomplete, got {sorted(parts)}")
        # open_clip's nn.MultiheadAttention splits in_proj into q, k, v rows in that order.
        out[f"{_O}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def omni_image_config_from_llava(llava_config, open_clip_model: str | None = None) -> ImageTowerConfig:
    """The image tower config whose features equal LLaVA's projector input.

    ``hidden_act="gelu"`` towers become a ``vision_cfg`` dict. ``quick_gelu`` towers (OpenAI CLIP,
    as in LLaVA-1.5) need an open_clip model config with ``"quick_gelu": true``; pass its name
    (e.g. "ViT-L-14-336-quickgelu") as ``open_clip_model``. Raises ValueError for any LLaVA
    setting the omni image path does not reproduce.
    """
    vc = llava_config.vision_config
    problems = []
    if vc.model_type != "clip_vision_model":
        problems.append(f"vision_config.model_type {vc.model_type!r} (only CLIP towers are mapped)")
    if llava_config.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy {llava_config.vision_feature_select_strategy!r} "
            "(omni drops the class token: 'default')"
        )
    if llava_config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {llava_config.projector_hidden_act!r} (MLPProjector uses exact GELU)")
    if not getattr(llava_config, "multimodal_projector_bias", True):
        problems.append("multimodal_projector_bias=False (MLPProjector has biases)")
    if vc.hidden_act not in ("gelu", "quick_gelu"):
        problems.append(f"vision hidden_act {vc.hidden_act!r} (open_clip towers use gelu or quick_gelu)")
    if vc.layer_norm_eps != 1e-5:
        problems.append(f"vision layer_norm_eps {vc.layer_norm_eps} (open_clip's LayerNorm uses 1e-5)")
    if vc.intermediate_size % vc.hidden_size:
        problems.append(f"vision intermediate_size {vc.intermediate_size} is not a multiple of hidden_size")
    layer = llava_config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r} (a list concatenates layers; omni takes one)")
    elif layer == 0 or not -vc.num_hidden_layers <= layer <= vc.num_hidden_layers:
        problems.append(f"vision_feature_layer {layer} (0 is the embeddings, not a block output)")
    if problems:
        raise ValueError("LLaVA config not reproducible by the omni image path: " + "; ".join(problems))

    # HF hidden_states[0] is the embeddings, [k] the output of block k-1; negative indices agree.
    feature_layer = layer if layer < 0 else layer - 1
    sizes = {
        "image_size": vc.image_size,
        "patch_size": vc.patch_size,
        "width": vc.hidden_size,
        "layers": vc.num_hidden_layers,
        "head_width": vc.hidden_size // vc.num_attention_heads,
        "mlp_ratio": vc.intermediate_size / vc.hidden_size,
    }
    if open_clip_model is None:
        if vc.hidden_act != "gelu":
            raise ValueError(
                "LLaVA's vision tower uses quick_gelu, which a vision_cfg tower cannot express; pass "
                "open_clip_model= an open_clip config with \"quick_gelu\": true (e.g. 'ViT-L-14-336-quickgelu')"
            )
        return ImageTowerConfig(vision_cfg=sizes, feature_layer=feature_layer)

    model_cfg = open_clip.get_model_config(open_clip_model)
    if model_cfg is None:
        raise ValueError(f"open_clip_model {open_clip_model!r} is not in open_clip's registry")
    ocv = model_cfg["vision_cfg"]
    defaults = CLIPVisionCfg()
    theirs = {k: ocv.get(k, getattr(defaults, k)) for k in sizes}
    mismatched = {k: (sizes[k], theirs[k]) for k in sizes if sizes[k] != theirs[k]}
    if bool(model_cfg.get("quick_gelu", False)) != (vc.hidden_act == "quick_gelu"):
        mismatched["quick_gelu"] = (vc.hidden_act == "quick_gelu", bool(model_cfg.get("quick_gelu", False)))
    if "timm_model_name" in ocv or mismatched:
        raise ValueError(
            f"open_clip_model {open_clip_model!r} does not match LLaVA's vision tower "
            f"(field: llava vs open_clip): {mismatched or 'it is a timm tower'}"
        )
    return ImageTowerConfig(open_clip_model=open_clip_model, feature_layer=feature_layer)


def load_llava_weights(model: nn.Module, llava_state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy LLaVA's weights into ``model`` (an OmniModel); returns the dropped (pruned-tower) keys.

    Strict for the image path and the LLM: every ``encoders.image.*``, ``projectors.image.*``
    and ``llm.*`` parameter must be covered, and the only LLaVA weights left over may be the
    CLIP blocks after the feature layer and ``post_layernorm`` that omni pruned.
    """
    converted = llava_to_omni_state_dict(llava_state_dict)
    own = model.state_dict()
    dropped = sorted(k for k in converted if k not in own)
    not_pruned = [k for k in dropped if not _PRUNABLE.match(k) or model.encoders["image"].cfg.feature_layer is None]
    if not_pruned:
        raise KeyError(f"load_llava_weights: OmniModel has no parameter for {not_pruned[:5]} (of {len(not_pruned)})")
    kept_blocks = len(model.encoders["image"].visual.transformer.resblocks)
    early = [k for k in dropped if (m := _PRUNABLE.match(k)).group(1) is not None and int(m.group(1)) < kept_blocks]
    if early:
        raise KeyError(f"load_llava_weights: {early[:5]} should have loaded into the tower")
    image_path = ("encoders.image.", "projectors.image.", "llm.")
    missing = sorted(k for k in own if k.startswith(image_path) and k not in converted)
    if missing:
        raise KeyError(f"load_llava_weights: LLaVA has no weight for {missing[:5]} (of {len(missing)})")
    result = model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return dropped
