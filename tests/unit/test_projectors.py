"""Projectors: token arithmetic, pooling values against hand computation, gradients, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from projectors import ConvGMLPProjector, MLPProjector, build_projector


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- MLPProjector


@pytest.mark.parametrize("side, expected", [(27, 182), (8, 16), (7, 12), (3, 2), (2, 1)])
def test_mlp_num_tokens_and_shapes(side, expected):
    proj = MLPProjector(in_dim=6, out_dim=10)
    assert proj.num_tokens(side * side) == expected == (side // 2) * math.ceil(side / 2)
    out = proj(torch.randn(2, side * side, 6))
    assert out.shape == (2, expected, 10)


def test_mlp_rejects_1x1_and_non_square_grids():
    proj = MLPProjector(4, 4)
    with pytest.raises(ValueError, match="at least 2x2"):
        proj.num_tokens(1)
    with pytest.raises(ValueError, match="at least 2x2"):
        proj(torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="square grid"):
        proj(torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match=r"\[N, T, in_dim\]"):
        proj(torch.randn(10, 4))


def _hand_pool(x: torch.Tensor) -> torch.Tensor:
    """Reference for the documented rule, one window at a time: [T, D] -> [tokens, D]."""
    side = math.isqrt(x.shape[0])
    grid = x.view(side, side, -1)
    rows = []
    for r in range(0, 2 * (side // 2), 2):
        for c in range(0, side, 2):
            window = grid[r : r + 2, c : min(c + 2, side)]
            rows.append(window.reshape(-1, x.shape[1]).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("side", [2, 3, 5, 6, 7, 27])
def test_mlp_pooling_matches_hand_computation(side):
    x = torch.randn(3, side * side, 5)
    pooled = MLPProjector(5, 5)._pool(x)
    for n in range(3):
        torch.testing.assert_close(pooled[n], _hand_pool(x[n]))


def test_mlp_pooling_3x3_by_hand():
    # grid [[0,1,2],[3,4,5],[6,7,8]]: last row dropped, last column averaged over its 2 values
    x = torch.arange(9.0).view(1, 9, 1)
    pooled = MLPProjector(1, 1)._pool(x)
    assert pooled.flatten().tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2]


def test_mlp_without_pool_is_llava_projector():
    proj = MLPProjector(6, 10, pool=False)
    assert [name for name, _ in proj.named_children()] == ["linear_1", "act", "linear_2"]
    assert proj.linear_1.bias is not None and proj.linear_2.bias is not None
    assert proj.linear_1.out_features == 10  # hidden defaults to out_dim, as in LLaVA
    for t in (1, 7, 729):
        assert proj.num_tokens(t) == t
    x = torch.randn(2, 7, 6)
    hidden = F.gelu(F.linear(x, proj.linear_1.weight, proj.linear_1.bias))
    expected = F.linear(hidden, proj.linear_2.weight, proj.linear_2.bias)
    torch.testing.assert_close(proj(x), expected)


def test_mlp_gradients_reach_every_parameter_and_input():
    proj = MLPProjector(4, 8, hidden_dim=12)
    x = torch.randn(2, 49, 4, requires_grad=True)
    proj(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mlp_meta_device_param_count():
    with torch.device("meta"):
        proj = MLPProjector(1152, 3584)
        out = proj(torch.empty(2, 729, 1152))
    assert out.shape == (2, 182, 3584)
    assert _params(proj) == 1152 * 3584 + 3584 + 3584 * 3584 + 3584


@pytest.mark.parametrize("bad", [dict(in_dim=0, out_dim=4), dict(in_dim=4, out_dim=4, hidden_dim=-1)])
def test_mlp_rejects_bad_dims(bad):
    with pytest.raises(ValueError, match="positive int"):
        MLPProjector(**bad)


# ---------------------------------------------------------------- ConvGMLPProjector


@pytest.mark.parametrize("t", [1, 3, 4, 5, 8, 50, 1500])
def test_conv_gmlp_num_tokens_and_shapes(t):
    proj = ConvGMLPProjector(in_dim=6, out_dim=10, stride=4)
    assert proj.num_tokens(t) == math.ceil(t / 4)
    assert proj(torch.randn(2, t, 6)).shape == (2, math.ceil(t / 4), 10)


def _hand_conv_gmlp(proj: ConvGMLPProjector, x: torch.Tensor) -> torch.Tensor:
    """Reference for one sample [T, D], window by window, following the module docstring."""
    s, t = proj.stride, x.shape[0]
    outs = []
    for start in range(0, t, s):
        real = x[start : start + s]
        window = torch.cat([real, real.new_zeros(s - real.shape[0], x.shape[1])])  # zero right-pad
        # Conv1d weight [hidden, in, k]: out = sum_j W[:, :, j] @ window[j] + b
        a = torch.einsum("hij,ji->h", proj.conv_a.weight, window) + proj.conv_a.bias
        b = torch.einsum("hij,ji->h", proj.conv_b.weight, window) + proj.conv_b.bias
        main = proj.proj(a * F.silu(b))
        outs.append(main + proj.shortcut(real.mean(0)))  # mean over real frames only
    return torch.stack(outs)


@pytest.mark.parametrize("t, stride", [(1, 4), (5, 4), (7, 3), (8, 4), (10, 2)])
def test_conv_gmlp_matches_hand_computation(t, stride):
    torch.manual_seed(0)
    proj = ConvGMLPProjector(in_dim=5, out_dim=7, stride=stride, hidden_dim=9)
    x = torch.randn(2, t, 5)
    out = proj(x)
    for n in range(2):
        torch.testing.assert_close(out[n], _hand_conv_gmlp(proj, x[n]), rtol=1e-5, atol=1e-5)


def test_conv_gmlp_windows_are_independent():
    # Each output token depends only on its own window: appending frames leaves earlier tokens unchanged.
    proj = ConvGMLPProjector(4, 6, stride=4)
    x = torch.randn(1, 9, 4)
    torch.testing.assert_close(proj(x[:, :8]), proj(x)[:, :2])


def test_conv_gmlp_gradients_reach_every_parameter_and_input():
    proj = ConvGMLPProjector(4, 8, stride=4)
    x = torch.randn(2, 13, 4, requires_grad=True)
    proj(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_gmlp_meta_device_param_count():
    with torch.device("meta"):
        proj = ConvGMLPProjector(1280, 3584, stride=4)
        out = proj(torch.empty(1, 1500, 1280))
    assert out.shape == (1, 375, 3584)  # 30 s of whisper frames -> 12.5 tokens/s
    conv = 1280 * 3584 * 4 + 3584
    assert _params(proj) == 2 * conv + (3584 * 3584 + 3584) + (1280 * 3584 + 3584)


def test_conv_gmlp_rejects_bad_args():
    with pytest.raises(ValueError, match="stride"):
        ConvGMLPProjector(4, 4, stride=0)
    with pytest.raises(ValueError, match="input_len"):
        ConvGMLPProjector(4, 4).num_tokens(0)


# ---------------------------------------------------------------- registry


def test_build_projector_registry():
    assert isinstance(build_projector("mlp", in_dim=4, out_dim=8), MLPProjector)
    conv = build_projector("conv_gmlp", in_dim=4, out_dim=8, stride=2)
    assert isinstance(conv, ConvGMLPProjector) and conv.stride == 2
    with pytest.raises(ValueError, match=r"unknown projector kind 'qformer'.*conv_gmlp.*mlp"):
        build_projector("qformer", in_dim=4, out_dim=8)
