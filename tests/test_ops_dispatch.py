"""The ops dispatcher: explicit choice of implementation, clear errors, and the depthwise conv reference."""
import pytest
import torch
import torch.nn.functional as F

import ops
from ops._dispatch import resolve_impl


def test_reference_is_depthwise_conv():
    x, w, b = torch.randn(2, 5, 9, 7), torch.randn(5, 1, 5, 5), torch.randn(5)
    out = ops.dwconv2d(x, w, b, padding=4, dilation=2)
    # channel c of the output depends only on channel c of the input
    for c in range(5):
        torch.testing.assert_close(out[:, c:c + 1], F.conv2d(x[:, c:c + 1], w[c:c + 1], b[c:c + 1], padding=4, dilation=2))
    with pytest.raises(ValueError, match="depthwise weight"):
        ops.dwconv2d(x, torch.randn(4, 1, 3, 3))


def test_dwconv_module_keeps_conv_keys_and_same_padding():
    m = ops.DWConv2d(6, 7, dilation=3)
    assert set(m.state_dict()) == {"weight", "bias"} and m.padding == (9, 9)
    x = torch.randn(1, 6, 11, 13)
    assert m(x).shape == x.shape


def test_impl_choice(monkeypatch):
    x = torch.randn(1)
    assert resolve_impl(None, x) == "reference"  # CPU tensor, auto
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", x)
    monkeypatch.setenv("METAMIXER_OPS_IMPL", "bogus")
    with pytest.raises(ValueError, match="METAMIXER_OPS_IMPL"):
        resolve_impl(None, x)
    monkeypatch.setenv("METAMIXER_OPS_IMPL", "reference")
    assert resolve_impl(None, x, supported=True) == "reference"
    with pytest.raises(ValueError, match="does not support"):
        resolve_impl("triton", x, supported=False)
    # the environment switches whole models: an op without a kernel for its arguments keeps the reference
    monkeypatch.setenv("METAMIXER_OPS_IMPL", "triton")
    assert resolve_impl(None, x, supported=False) == "reference"
    with pytest.raises(ValueError, match="does not support"):
        resolve_impl("triton", x, supported=False)


def test_autocast_queries_accept_meta_tensors():
    # timm builds and traces models on the meta device; torch.is_autocast_enabled('meta') raises there
    from ops._dispatch import autocast_dtype
    from ops.halo_attention import halo_attention
    from ops.spiking_attention import spiking_attention
    assert autocast_dtype(torch.empty(1, device="meta")) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.empty(1)) == torch.bfloat16
    q = torch.randn(1, 2, 4, 8, 8, device="meta")  # (B, heads, d, H, W)
    rel = torch.randn(2 * (4 + 2) - 1, 4, device="meta")
    assert halo_attention(q, q, q, rel, rel, block_size=4, halo_size=1).shape == (1, 8, 8, 8)
    s = torch.randn(2, 1, 2, 16, 4, device="meta")  # (T, B, heads, N, d)
    assert spiking_attention(s, s, s, 0.125).shape == s.shape
