"""mix_shift: the Triton kernels against the reference, values and gradients, on awkward shapes.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import sys

import pytest
import torch

from ops.mix_shift import mix_shift, mix_shift_chunk_sizes, mix_shift_reference
from ops._dispatch import triton_available

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cudnn.allow_tf32 = False  # the reference must be true fp32 on GPU
torch.backends.cuda.matmul.allow_tf32 = False
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

MSMLP_KS = [(1, 1), (1, 1), (3, 3), (5, 5), (7, 7)]  # MS-MLP's first stage, both directions
CASES = [  # B, C, H, W, kernel sizes (lr, td), shifts, channels_last, bias
    (1, 7, 5, 6, ([(1, 1), (3, 3), (5, 3)], [(3, 1), (1, 1), (3, 5)]), (-2, 0, 3), False, True),
    (2, 7, 5, 6, ([(1, 1), (3, 3), (5, 3)], [(3, 1), (1, 1), (3, 5)]), (-2, 0, 3), True, True),
    (2, 10, 6, 5, (MSMLP_KS, MSMLP_KS), (-2, -1, 0, 1, 2), True, False),    # kernel wider than the map
    (1, 13, 5, 7, (MSMLP_KS, MSMLP_KS), (-2, -1, 0, 1, 2), False, True),    # uneven groups 3,3,3,3,1
    (2, 6, 3, 4, ([(3, 3), (5, 5)], [(5, 5), (3, 3)]), (7, -9), True, True),  # shifts larger than H and W
    (1, 27, 6, 7, ([(3, 3), (1, 1), (5, 5)], [(1, 3), (3, 3), (1, 1)]), (1, -1, 2), True, True),  # overlapping blocks
]


def _params(C, ks, shifts, bias, dtype=torch.float32):
    sizes = mix_shift_chunk_sizes(C, len(shifts))
    ws = [[torch.randn(c, 1, *k, device=DEVICE, dtype=dtype) for c, k in zip(sizes, kd)] for kd in ks]
    bs = [[torch.randn(c, device=DEVICE, dtype=dtype) if bias else None for c in sizes] for _ in ks]
    return ws, bs


@pytest.mark.parametrize("B,C,H,W,ks,shifts,cl,bias", CASES)
def test_triton_matches_reference(B, C, H, W, ks, shifts, cl, bias):
    torch.manual_seed(B * 100 + C * 10 + H)
    x = torch.randn(B, C, H, W, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    ws, bs = _params(C, ks, shifts, bias)
    params = [w for d in ws for w in d] + [b for d in bs for b in d if b is not None]
    leaves = [t.requires_grad_() for t in [x] + params]
    ref = mix_shift_reference(x, ws, bs, shifts)
    out = mix_shift(x, ws, bs, shifts, impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# channels-last with every group's kernels square and equal in both directions: the row-segment kernels
SEG_CASES = [  # B, C, H, W, kernel size per group, shifts, bias
    (2, 10, 6, 5, (1, 1, 3, 5, 7), (-2, -1, 0, 1, 2), True),     # kernels wider than the map, rows < 7 pixels
    (1, 23, 9, 16, (3, 1, 5, 7), (3, -1, 2, -5), False),        # uneven groups 6,6,6,5; W not a multiple of 7
    (2, 13, 5, 7, (9, 3, 1, 5, 7), (-2, -1, 0, 1, 2), True),     # 9x9; groups 3,3,3,3,1
    (1, 20, 3, 15, (7, 5), (17, -16), True),                    # shifts beyond H and W
]


@pytest.mark.parametrize("B,C,H,W,ks,shifts,bias", SEG_CASES)
def test_row_segment_kernels_match_reference(B, C, H, W, ks, shifts, bias, monkeypatch):
    ms = sys.modules["ops.mix_shift"]  # the module (``ops.mix_shift`` is also the function's name)
    used = []
    orig = ms._seg_kernel
    monkeypatch.setattr(ms, "_seg_kernel", lambda k, mode: used.append(mode) or orig(k, mode))
    torch.manual_seed(C * 7 + W)
    x = torch.randn(B, C, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    kd = [(k, k) for k in ks]
    ws, bs = _params(C, (kd, kd), shifts, bias)
    leaves = [t.requires_grad_() for t in [x] + [w for d in ws for w in d] + [b for d in bs for b in d if b is not None]]
    ref = mix_shift_reference(x, ws, bs, shifts)
    out = mix_shift(x, ws, bs, shifts, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)  # NCHW: the backward converts it
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert used == ["fwd", "bwd_td", "bwd_lr", "wgrad"]


def test_bf16_accumulates_in_fp32():
    """bf16 output and input gradient within one rounding step of the fp32 reference on the same bf16 inputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8, 7, device=DEVICE).to(memory_format=torch.channels_last)
    ws, bs = _params(10, (MSMLP_KS, MSMLP_KS), (-2, -1, 0, 1, 2), True)
    (xb,), (xf,) = lowp([x.requires_grad_()], torch.bfloat16)
    wb, wf = zip(*(lowp(d, torch.bfloat16) for d in ws))  # per direction: (bf16 weights, fp32 upcasts)
    bb, bf = zip(*(lowp(d, torch.bfloat16) for d in bs))
    ref = mix_shift_reference(xf, list(wf), list(bf), (-2, -1, 0, 1, 2))
    out = mix_shift(xb, list(wb), list(bb), (-2, -1, 0, 1, 2), impl="triton")
    g = torch.randn_like(ref).bfloat16()
    (gout,), (gref,) = torch.autograd.grad(out, xb, g), torch.autograd.grad(ref, xf, g.float())
    assert out.dtype == torch.bfloat16 and gout.dtype == torch.bfloat16
    assert_rounding(out, ref, torch.bfloat16, what="output")
    assert_rounding(gout, gref, torch.bfloat16, what="grad of x")


def test_dispatch_fp64_and_dtype_checks():
    x = torch.randn(1, 5, 4, 4, device=DEVICE, dtype=torch.float64)
    ws, bs = _params(5, ([(1, 1)] * 5, [(3, 3)] * 5), (-2, -1, 0, 1, 2), True, torch.float64)
    # auto: float64 always takes the reference (parity tests run through it)
    assert torch.equal(mix_shift(x, ws, bs, (-2, -1, 0, 1, 2)), mix_shift_reference(x, ws, bs, (-2, -1, 0, 1, 2)))
    with pytest.raises(ValueError, match="does not support"):
        mix_shift(x, ws, bs, (-2, -1, 0, 1, 2), impl="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        mix_shift(x.float(), ws, bs, (-2, -1, 0, 1, 2), impl="triton")


@pytest.mark.skipif(DEVICE == "cpu", reason="model-sized shapes: GPU only (too slow for the interpreter)")
@pytest.mark.parametrize("C,H,ks", [(96, 56, (1, 1, 3, 5, 7)), (192, 28, (1, 3, 3, 5, 7)), (768, 7, (1, 7, 7, 7, 7))])
@pytest.mark.parametrize("cl", [True, False])
def test_msmlp_shapes_on_gpu(C, H, ks, cl):
    torch.manual_seed(C)
    x = torch.randn(2, C, H, H, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    kd = [(k, k) for k in ks]
    ws, bs = _params(C, (kd, kd), (-2, -1, 0, 1, 2), True)
    leaves = [t.requires_grad_() for t in [x] + [w for d in ws for w in d] + [b for d in bs for b in d]]
    ref = mix_shift_reference(x, ws, bs, (-2, -1, 0, 1, 2))
    out = mix_shift(x, ws, bs, (-2, -1, 0, 1, 2), impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


def test_torch_compile():
    """The op traces as an opaque custom op (no graph break); on CPU without inductor (no C++ build in CI)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    x = torch.randn(2, 10, 8, 8, device=DEVICE, requires_grad=True)
    ws, bs = _params(10, (MSMLP_KS, MSMLP_KS), (-2, -1, 0, 1, 2), True)
    fn = torch.compile(lambda t: mix_shift(t, ws, bs, (-2, -1, 0, 1, 2), impl="triton").square().sum(), fullgraph=True,
                       backend=backend)
    (got,) = torch.autograd.grad(fn(x), x)
    (want,) = torch.autograd.grad(mix_shift_reference(x, ws, bs, (-2, -1, 0, 1, 2)).square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
