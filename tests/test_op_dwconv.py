"""dwconv2d: the Triton kernels against the reference, values and gradients, on awkward shapes.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import pytest
import torch

from ops import dwconv2d, dwconv2d_reference
from ops._dispatch import triton_available

from lowp import assert_rounding, lowp, to_low

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cudnn.allow_tf32 = False  # the reference must be true fp32 on GPU
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [  # B, C, H, W, k, dilation, channels_last, bias
    (1, 3, 7, 5, 3, 1, False, True),
    (2, 5, 9, 11, 7, 1, True, True),
    (1, 6, 13, 10, 7, 3, False, False),   # VAN's dilated 7x7 on a map smaller than its reach
    (2, 4, 6, 9, 5, 2, True, True),
    (1, 3, 17, 15, 13, 1, True, False),
    (2, 36, 7, 7, 7, 3, True, True),      # small-map tiles (4x8 x 16 channels): whole tap rows/columns skipped
    (1, 64, 5, 6, 3, 2, True, True),      # tiny-map tiles (2x4 x 64 channels)
    (1, 20, 12, 13, 5, 4, True, False),   # 4x8 tiles, partial channel block, dead taps at the edges
]
SEG_CASES = [  # channels-last, C a multiple of 8, 5x5..9x9, wide maps: the row-segment kernels (partial pixel groups)
    (2, 24, 5, 31, 7, 1, True, True),
    (1, 16, 4, 59, 7, 3, True, False),    # residues modulo the dilation
    (1, 40, 3, 58, 5, 2, True, True),
    (1, 64, 3, 29, 9, 1, True, True),
]
ROW_CASES = [  # channels-last, C a multiple of 8, k >= 5, narrow maps: the whole-row kernels
    (2, 24, 9, 11, 7, 1, True, True),     # 16 images per block: a partial image block
    (1, 16, 9, 22, 7, 3, True, False),
    (3, 40, 7, 7, 7, 3, True, True),      # VAN's dilated 7x7 on a map smaller than its reach; 8-channel blocks
    (2, 32, 6, 33, 5, 2, True, True),     # dilated, 29-56 wide: two warps, two channels per thread
    (1, 64, 5, 13, 9, 1, True, False),
]
CASES += SEG_CASES + ROW_CASES


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("B,C,H,W,k,dil,cl,bias", CASES)
def test_triton_matches_reference(B, C, H, W, k, dil, cl, bias):
    torch.manual_seed(B * 100 + C * 10 + k)
    x = torch.randn(B, C, H, W, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, device=DEVICE, dtype=x.dtype)
    b = torch.randn(C, device=DEVICE, dtype=x.dtype) if bias else None
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    pad = dil * (k - 1) // 2
    ref = dwconv2d_reference(x, w, b, 1, pad, dil)
    out = dwconv2d(x, w, b, 1, pad, dil, impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,C,H,W,k,dil,cl,bias", SEG_CASES)
def test_row_segment_kernel_takes_these_shapes(B, C, H, W, k, dil, cl, bias):
    from ops import dwconv as D
    x = torch.empty(B, C, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    assert D._row_config(x, k, dil) is None and D._seg_config(x, k, dil) is not None  # so the tests above cover it
    assert D._seg_config(x.contiguous(), k, dil) is None  # NCHW: the tap-loop kernel


@pytest.mark.parametrize("B,C,H,W,k,dil,cl,bias", ROW_CASES)
def test_whole_row_kernel_takes_these_shapes(B, C, H, W, k, dil, cl, bias):
    from ops import dwconv as D
    x = torch.empty(B, C, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    assert D._row_config(x, k, dil) is not None  # so test_triton_matches_reference covers that kernel
    assert D._row_config(x.contiguous(), k, dil) is None


@pytest.mark.parametrize("B,C,m,H,W,k,s,dil,cl", [
    (2, 8, 2, 9, 11, 7, 2, 1, True),   # ffnet's stage transition: stride 2, channel multiplier 2, odd map
    (1, 5, 1, 10, 7, 3, 2, 1, False),
    (1, 4, 3, 7, 9, 5, 1, 2, True),    # multiplier only
    (1, 3, 2, 6, 6, 3, 3, 1, False),
])
def test_strided_and_multiplier_convs_match_reference(B, C, m, H, W, k, s, dil, cl):
    torch.manual_seed(C * 10 + k)
    x = torch.randn(B, C, H, W, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(C * m, 1, k, k, device=DEVICE), torch.randn(C * m, device=DEVICE)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    pad = dil * (k - 1) // 2
    ref = dwconv2d_reference(x, w, b, s, pad, dil)
    out = dwconv2d(x, w, b, s, pad, dil, impl="triton")
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)])
def test_strided_multiplier_conv_partial_gradients(need):
    """Only the gradients asked for (a frozen input, frozen weights), and the same values as the reference."""
    x = torch.randn(2, 8, 9, 11, device=DEVICE).to(memory_format=torch.channels_last)
    w, b = torch.randn(16, 1, 7, 7, device=DEVICE), torch.randn(16, device=DEVICE)
    for t, n in zip((x, w, b), need):
        t.requires_grad_(n)
    inputs = [t for t, n in zip((x, w, b), need) if n]
    out, ref = dwconv2d(x, w, b, 2, 3, 1, impl="triton"), dwconv2d_reference(x, w, b, 2, 3, 1)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_strided_multiplier_conv_keeps_no_more_for_backward_than_the_reference():
    """Training memory: eager autograd keeps x for the backward, not the m-fold copy the kernels convolve."""
    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn()
        return sum(sizes)
    x = torch.randn(2, 8, 12, 12, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 1, 7, 7, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    hub = saved_bytes(lambda: dwconv2d(x, w, b, 2, 3, 1, impl="triton"))
    assert 0 < hub <= saved_bytes(lambda: dwconv2d_reference(x, w, b, 2, 3, 1))


def test_auto_prefers_triton_where_measured_faster(monkeypatch):
    """auto's fixed rule where it does not measure (the ``preferred`` flag the dispatcher hands to resolve_impl):
    plain 7x7 convs on channels-last maps up to 28 wide (the whole-row kernels), not on wider maps or NCHW;
    dilated convs everywhere."""
    from ops import dwconv as D
    seen = []
    monkeypatch.setattr(D, "resolve_impl", lambda impl, x, supported=True, preferred=True, **kw:
                        seen.append(preferred) or "reference")
    w7 = torch.randn(16, 1, 7, 7)
    for H, cl, dil in [(14, True, 1), (56, True, 1), (14, False, 1), (56, False, 3)]:
        x = torch.randn(1, 16, H, H)
        dwconv2d(x.to(memory_format=torch.channels_last) if cl else x, w7, None, 1, 3 * dil, dil)
    assert seen == [True, False, False, True]


def test_module_rejects_wrong_channel_count():
    from ops import DWConv2d
    conv = DWConv2d(8, 7, stride=2, out_dim=16)  # 16 weights would also fit a 4- or 16-channel input
    with pytest.raises(ValueError, match=r"expected \(B, 8, H, W\)"):
        conv(torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_low_precision_accumulates_in_fp32(dt, cl):
    """Output and gradients within one rounding step of the fp32 reference on the same low-precision inputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, device=DEVICE, requires_grad=True)
    x = x.to(memory_format=torch.channels_last) if cl else x
    w, b = torch.randn(8, 1, 7, 7, device=DEVICE, requires_grad=True), torch.randn(8, device=DEVICE, requires_grad=True)
    (xl, wl, bl), (xf, wf, bf) = lowp([x, w, b], dt)
    out, ref = dwconv2d(xl, wl, bl, 1, 3, 1, impl="triton"), dwconv2d_reference(xf, wf, bf, 1, 3, 1)
    assert out.dtype == dt
    assert_rounding(out, ref, dt, what="output")
    g = torch.randn_like(ref).to(dt)
    for name, got, want in zip("xwb", torch.autograd.grad(out, (xl, wl, bl), g),
                               torch.autograd.grad(ref, (xf, wf, bf), g.float())):
        assert_rounding(got, want, dt, what=f"grad of {name}")


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_bound_catches_low_precision_accumulation(dt):
    """The bound above is tight enough to fail a 7x7 depthwise conv that accumulates in the low dtype, and loose
    enough to pass the exact result rounded once (conversions as the kernels make them, see tests/lowp.py)."""
    torch.manual_seed(0)
    (xl, wl), (xf, wf) = lowp([torch.randn(2, 8, 12, 12), torch.randn(8, 1, 7, 7)], dt)
    ref = dwconv2d_reference(xf, wf, None, 1, 3, 1)
    xp, acc = torch.nn.functional.pad(xf, (3, 3, 3, 3)), torch.zeros_like(ref)
    for i in range(7):
        for j in range(7):
            acc = to_low(acc + xp[:, :, i:i + 12, j:j + 12] * wf[:, 0, i, j, None, None], dt).float()
    assert_rounding(to_low(ref, dt), ref, dt)
    with pytest.raises(AssertionError, match="rounding step"):
        assert_rounding(acc, ref, dt)


def test_unsupported_arguments_fall_back_or_refuse():
    x, w = torch.randn(1, 4, 8, 8, device=DEVICE), torch.randn(4, 1, 3, 3, device=DEVICE)
    # 'valid' padding (not 'same'): auto takes the reference, a forced Triton call is refused
    torch.testing.assert_close(dwconv2d(x, w, None, 1, 0), dwconv2d_reference(x, w, None, 1, 0))
    with pytest.raises(ValueError, match="does not support"):
        dwconv2d(x, w, None, stride=1, padding=0, impl="triton")


def test_custom_op_path_matches_reference():
    """The path torch.compile takes (the registered custom op and its backward) computes the same."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 1, 5, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    out = torch.ops.metamixer.dwconv2d(x, w, b, 2)
    ref = dwconv2d_reference(x, w, b, 1, 4, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, (x, w, b), g), _grads(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton kernels needs a GPU")
def test_torch_compile():
    x = torch.randn(2, 16, 20, 20, device="cuda", requires_grad=True)
    w = torch.randn(16, 1, 7, 7, device="cuda", requires_grad=True)
    fn = torch.compile(lambda x, w: dwconv2d(x, w, None, 1, 9, 3, impl="triton").square().sum())
    out = fn(x, w)
    ref = dwconv2d_reference(x, w, None, 1, 9, 3).square().sum()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    gx, gw = torch.autograd.grad(out, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-2)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_ops_fake_kernels_match(channels_last):
    # torch.compile trusts the fake kernels' shapes and strides (a wrong weight-grad stride failed on the GPU)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 16, 9, 7, device=dev).to(memory_format=fmt).requires_grad_()
    w = torch.randn(16, 1, 7, 7, device=dev, requires_grad=True)
    g = torch.randn(2, 16, 9, 7, device=dev)  # NCHW grad for a channels-last x: the layout conversion path
    torch.library.opcheck(torch.ops.metamixer.dwconv2d, (x, w, None, 2))
    torch.library.opcheck(torch.ops.metamixer.dwconv2d_backward, (g, x.detach(), w.detach(), 2, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
