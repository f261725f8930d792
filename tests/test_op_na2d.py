"""na2d_qk / na2d_av: the Triton kernels against the reference (NATTEN 0.17 semantics), values and gradients.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
Shapes are awkward on purpose: odd and non-square maps, dilation > 1, maps barely larger than kernel * dilation
(every pixel is then a border pixel with a shifted window), head widths that are not powers of two.
"""
import pytest
import torch

from ops.na2d import na2d_av, na2d_av_reference, na2d_qk, na2d_qk_reference
from ops._dispatch import triton_available

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [  # B, heads, H, W, D, kernel_size, dilation
    (1, 2, 9, 7, 5, 3, 1),
    (2, 1, 10, 13, 4, 5, 2),
    (1, 2, 7, 7, 3, 7, 1),     # H == W == k: the window is the whole map for every pixel
    (1, 1, 11, 9, 6, 3, 3),    # 9 == k * dilation on the W axis
    (1, 1, 13, 14, 5, 13, 1),  # OverLoCK's 13x13 ContMix kernel on a map of 13 x 14
    (2, 1, 9, 8, 3, 5, 1),     # k < H < 2k: a middle pixel is in every pixel's window (longest inverse run)
    (1, 2, 11, 12, 4, 3, 2),   # the same per dilation group, groups of unequal length
]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("B,G,H,W,D,k,dil", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_qk_matches_reference(B, G, H, W, D, k, dil, bias):
    torch.manual_seed(H * 100 + W * 10 + k)
    q = torch.randn(B, G, H, W, D, device=DEVICE, requires_grad=True)
    key = torch.randn(B, G, H, W, D, device=DEVICE, requires_grad=True)
    rpb = torch.randn(G, 2 * k - 1, 2 * k - 1, device=DEVICE, requires_grad=True) if bias else None
    inputs = [t for t in (q, key, rpb) if t is not None]
    ref = na2d_qk_reference(q, key, k, dil, rpb)
    out = na2d_qk(q, key, k, dil, rpb, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,G,H,W,D,k,dil", CASES)
def test_av_matches_reference(B, G, H, W, D, k, dil):
    torch.manual_seed(H * 100 + W * 10 + k + 1)
    attn = torch.randn(B, G, H, W, k * k, device=DEVICE, requires_grad=True)
    value = torch.randn(B, G, H, W, D, device=DEVICE, requires_grad=True)
    ref = na2d_av_reference(attn, value, k, dil)
    out = na2d_av(attn, value, k, dil, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, (attn, value), g), _grads(ref, (attn, value), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_overlock_layouts():
    """OverLoCK passes a channels-first value view ([B, G, H, W, c] with c strided by H*W) and a softmax of a
    split of the logits; the kernels read any strides."""
    B, G, c, H, W, k, s = 1, 2, 3, 8, 7, 7, 5
    x = torch.randn(B, 2 * G * c, H, W, device=DEVICE, requires_grad=True)
    logits = torch.randn(B, G, H, W, s * s + k * k, device=DEVICE, requires_grad=True)
    value = x.reshape(B, 2, G, c, H, W).permute(1, 0, 2, 4, 5, 3)
    attn_s, attn_k = logits.split([s * s, k * k], dim=-1)
    outs = []
    for impl in ("reference", "triton"):
        out = torch.cat([na2d_av(attn_s, value[0], s, impl=impl),
                         na2d_av(attn_k.softmax(-1), value[1], k, impl=impl)], 1)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (x, logits))))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(dt):
    """Outputs and gradients within one rounding step of the fp32 reference on the same low-precision inputs."""
    B, G, H, W, D, k = 1, 2, 6, 7, 8, 5
    q, key = torch.randn(2, B, G, H, W, D, device=DEVICE).unbind(0)
    attn = torch.randn(B, G, H, W, k * k, device=DEVICE).softmax(-1)
    (q, key, attn), (qf, keyf, attnf) = lowp([t.requires_grad_() for t in (q, key, attn)], dt)
    for name, fn, ref_fn, a, af in (("na2d_qk", na2d_qk, na2d_qk_reference, (q, key), (qf, keyf)),
                                    ("na2d_av", na2d_av, na2d_av_reference, (attn, key), (attnf, keyf))):
        out, ref = fn(*a, k, impl="triton"), ref_fn(*af, k)
        assert out.dtype == dt
        assert_rounding(out, ref, dt, what=name)
        g = torch.randn_like(ref).to(dt)
        for got, want in zip(torch.autograd.grad(out, a, g), torch.autograd.grad(ref, af, g.float())):
            assert_rounding(got, want, dt, what=f"{name} gradient")


def test_float64_stays_on_reference_and_bad_arguments_raise():
    q = torch.randn(1, 1, 6, 6, 4, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(na2d_qk(q, q, 3), na2d_qk_reference(q, q, 3))  # auto: the reference
    with pytest.raises(ValueError, match="does not support"):
        na2d_qk(q, q, 3, impl="triton")
    q = q.float()
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        na2d_qk(q, q, 5, dilation=2, impl="triton")
    with pytest.raises(ValueError, match="odd kernel_size"):
        na2d_av(torch.randn(1, 1, 6, 6, 16, device=DEVICE), q, 4, impl="triton")
    with pytest.raises(ValueError, match="does not support"):  # one bias shared by all heads: reference only
        q2 = torch.randn(1, 2, 6, 6, 4, device=DEVICE)
        na2d_qk(q2, q2, 3, rpb=torch.randn(1, 5, 5, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="shapes differ"):
        na2d_qk(q, torch.randn(1, 1, 6, 6, 8, device=DEVICE), 3, impl="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        na2d_av(torch.randn(1, 1, 6, 6, 9, device=DEVICE).half(), q, 3, impl="triton")


@pytest.mark.parametrize("op", ["na2d_qk", "na2d_av", "na2d_inverse"])
def test_custom_op_registration(op):
    """torch.library.opcheck: fake (meta) functions, schema, autograd registration (needed by torch.compile)."""
    a = torch.randn(1, 1, 5, 6, 9 if op != "na2d_qk" else 3, device=DEVICE, requires_grad=op != "na2d_inverse")
    b = torch.randn(1, 1, 5, 6, 3, device=DEVICE, requires_grad=op != "na2d_inverse")
    args = (a, b, None, 3, 1) if op == "na2d_qk" else (a, b, 3, 1)
    torch.library.opcheck(getattr(torch.ops.metamixer, op), args)
