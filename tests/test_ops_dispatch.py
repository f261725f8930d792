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


def test_auto_measures_once_per_signature(monkeypatch):
    """auto times both paths (forward and backward, on copies of the arguments) at the first call of a signature,
    keeps the faster, and measures again only for a new signature."""
    from ops import _dispatch as D
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(D, "_CHOSEN", {})
    timed = []

    def fake_median_ms(fn):
        fn()  # the candidate must run, backward included
        timed.append(len(timed))
        return {0: 2.0, 1: 1.0, 2: 1.0, 3: 3.0}[len(timed) - 1]  # triton faster first, then the reference

    monkeypatch.setattr(D, "_median_ms", fake_median_ms)
    received = []
    op = D._OPS["dwconv2d"]
    monkeypatch.setitem(D._OPS, "dwconv2d", lambda *a, **kw: received.append(a[:2]) or op(*a, **kw))
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    args = (x, w, None, 1, 3, 1)
    assert D._measured_choice("dwconv2d", args, x) == "triton" and len(timed) == 2
    assert D._measured_choice("dwconv2d", args, x) == "triton" and len(timed) == 2  # cached
    # measured on copies with the same values and layout, never on the caller's tensors
    assert received and all(a is not x and b is not w and torch.equal(a, x) and torch.equal(b, w) for a, b in received)
    wider = torch.randn(1, 8, 9, 11)
    assert D._measured_choice("dwconv2d", (wider, w, None, 1, 3, 1), wider) == "reference" and len(timed) == 4


def test_auto_measures_at_trace_time_without_graph_break(monkeypatch):
    """Under torch.compile the measurement runs once while dynamo traces (a constant of the graph), with the
    signature the traced call sees, and the graph stays whole (fullgraph=True raises on a break)."""
    from ops import _dispatch as D
    monkeypatch.setattr(D, "_CHOSEN", {})
    seen = []
    monkeypatch.setattr(D, "_measure", lambda name, key, device, args=None: seen.append((name, key)) or "triton")

    def f(x, w):
        return x * 3 if D._measured_choice("dwconv2d", (x, w, None, 1, 3, 1), x) == "triton" else x * 2

    x, w = torch.randn(1, 8, 9, 9, requires_grad=True), torch.randn(8, 1, 7, 7)
    with torch.autocast("cpu", torch.bfloat16):
        out = torch.compile(f, backend="eager", fullgraph=True)(x, w)
    torch.testing.assert_close(out, x * 3)
    assert len(seen) == 1 and seen[0][1][1:] == (True, "bfloat16")  # grad mode and autocast are in the signature


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures on a GPU")
def test_auto_measures_on_the_gpu(monkeypatch):
    """On a CUDA tensor auto times both paths once per signature and gives the same values as the path it chose."""
    from ops import _dispatch as D
    monkeypatch.setattr(D, "_CHOSEN", {})
    monkeypatch.setenv("METAMIXER_OPS_AUTOTUNE", "1")
    x = torch.randn(4, 32, 28, 28, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(32, 1, 7, 7, device="cuda", requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        out = ops.dwconv2d(x, w, None, 1, 9, 3)
        (choice,) = D._CHOSEN.values()
        torch.testing.assert_close(out, ops.dwconv2d(x, w, None, 1, 9, 3, impl=choice))
    assert len(D._CHOSEN) == 1 and x.grad is None


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
